// Make a range of this process's address space resident and locked: one
// MADV_POPULATE_{READ,WRITE} (which, unlike mlock, reports a range it cannot
// fault in) and one mlock per run.
#pragma once

#include <cstdint>

#include "iomm/result.hpp"

namespace iomm::mem {

// On failure the range may be left partly marked locked (a failed mlock does
// not take its mark back): the caller munlocks the pages it owns, and only
// those, since munlock would also cancel the application's own mlock.
Status populate_and_lock(void* addr, uint64_t length, bool write);

// MADV_POPULATE_WRITE alone, for a range already resident and locked by a
// pin for read: EFAULT where it cannot be written.
Status populate_writable(void* addr, uint64_t length);

// For a mapping the library made itself (a file mapped shared, read-write
// when the fd allows it): mlock alone faults every page in. That walks the
// range once where MADV_POPULATE + mlock walks it twice (measured at 0.6x of
// mlock alone). mlock fails when a page cannot be faulted in (do_mlock
// populates with __mm_populate(start, len, 0): errors are not ignored), so
// past the end of a shrunk file it is ENOMEM, like the memlock limit (the
// caller tells them apart). It succeeds without faulting anything in only
// where it populates nothing (VM_IO, VM_PFNMAP): verify checks with mincore
// that every page is resident, EFAULT otherwise. ENOMEM for the kernel's
// memlock limit.
Status lock_resident(void* addr, uint64_t length, bool verify);
// munlock; never fails (the range was locked by populate_and_lock or
// lock_resident).
void unlock_range(void* addr, uint64_t length) noexcept;

}  // namespace iomm::mem
