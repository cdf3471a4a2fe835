// How a device (a software domain's DMA) reaches the memory behind a
// translation. Each backing object kind declares its own; page-table leaves
// carry it so a DMA needs no lookup of the object.
#pragma once

#include <cstdint>

namespace iomm::mem {

enum class HostAccess : uint8_t {
  // A mapping the library made and keeps while it is pinned (a file): plain
  // copies, guarded by safe_copy against SIGBUS from a file that shrank.
  direct = 0,
  // The caller's virtual memory, which the caller may unmap or mprotect at
  // any time: copies go through checked_copy (process_vm_readv/writev) and
  // fail with EFAULT instead of a SIGSEGV.
  checked = 1,
  // Nothing behind the address (simulated memory).
  none = 2,
};

}  // namespace iomm::mem
