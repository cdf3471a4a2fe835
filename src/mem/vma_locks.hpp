// Which parts of an address range the kernel already holds locked (VM_LOCKED
// VMAs: the application's mlock, mlock2, or mlockall with MCL_CURRENT or
// MCL_FUTURE). A cheap probe (msync) answers "none" without reading
// /proc/self/smaps; otherwise its "lo" flags give the locked runs.
//
// mlock is not counted: one munlock unlocks a page however many mlocks it
// had. The user-memory pin path asks this before it locks a run so that
// unpinning never munlocks what the application locked itself.
#pragma once

#include <cstdint>
#include <vector>

#include "iomm/result.hpp"

namespace iomm::mem {

struct PageRun {
  uint64_t first;  // page index (address >> kPageShift)
  uint64_t last;   // inclusive
};

// The locked runs of pages [first, last], in address order. When some are
// locked, smaps is read up to the VMA that covers `last` (its cost grows
// with the resident memory below that point). Errors: the errno of opening or
// reading /proc/self/smaps; ENOMEM.
Result<std::vector<PageRun>> vm_locked_runs(uint64_t first, uint64_t last);

}  // namespace iomm::mem
