#include "mem/populate.hpp"

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "core/errno_text.hpp"
#include "iomm/range.hpp"
#include "mem/mem_object.hpp"
#include "mem/sys.hpp"

// The build headers may predate these (Linux 5.14); the running kernel is
// checked by the call itself (EINVAL means unsupported).
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace iomm::mem {

namespace {

Status populate(void* addr, uint64_t length, bool write) {
  if (sys::madvise(addr, length, write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ) != 0) {
    const int err = errno;
    return Error(pin_errno(err), "cannot fault in " + std::to_string(length) + " bytes at " +
                                     std::to_string(reinterpret_cast<uintptr_t>(addr)) +
                                     (write ? " for writing: " : ": ") + errno_text(err));
  }
  return {};
}

}  // namespace

Status populate_writable(void* addr, uint64_t length) { return populate(addr, length, true); }

Status populate_and_lock(void* addr, uint64_t length, bool write) {
  if (Status st = populate(addr, length, write); !st) return st;
  if (sys::mlock(addr, length) != 0) {
    const int err = errno;
    // The range was just faulted in, so ENOMEM here is the kernel's own
    // RLIMIT_MEMLOCK (for a process without CAP_IPC_LOCK), not a bad address.
    const bool limit = err == ENOMEM || err == EPERM || err == EAGAIN;
    return Error(limit ? ENOMEM : pin_errno(err),
                 "mlock of " + std::to_string(length) + " bytes failed: " + errno_text(err));
  }
  return {};
}

Status lock_resident(void* addr, uint64_t length, bool verify) {
  if (sys::mlock(addr, length) != 0) {
    const int err = errno;
    // mlock marks the range locked before it faults pages in, and a failed
    // fault does not take the mark back: undo it, or VmLck leaks.
    unlock_range(addr, length);
    return Error(err == ENOMEM || err == EPERM || err == EAGAIN ? ENOMEM : pin_errno(err),
                 "mlock of " + std::to_string(length) + " bytes failed: " + errno_text(err));
  }
  if (!verify) return {};
  // mlock leaves alone what it does not populate (VM_IO and VM_PFNMAP
  // mappings, which a regular file has only when a driver backs it) and
  // still succeeds; find such pages.
  constexpr uint64_t kChunkPages = 4096;
  unsigned char resident[kChunkPages];
  auto* base = static_cast<std::byte*>(addr);
  for (uint64_t off = 0; off < length; off += kChunkPages * kPageSize) {
    const uint64_t chunk = std::min(length - off, kChunkPages * kPageSize);
    bool ok = sys::mincore(base + off, chunk, resident) == 0;
    for (uint64_t i = 0; ok && i < chunk / kPageSize; ++i) ok = (resident[i] & 1) != 0;
    if (!ok) {
      unlock_range(addr, length);
      return Error(EFAULT, "memory at offset " + std::to_string(off) +
                               " of the range cannot be made resident");
    }
  }
  return {};
}

void unlock_range(void* addr, uint64_t length) noexcept { syscall(SYS_munlock, addr, length); }

}  // namespace iomm::mem
