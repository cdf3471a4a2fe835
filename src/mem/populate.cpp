#include "mem/populate.hpp"

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "mem/mem_object.hpp"

// The build headers may predate these (Linux 5.14); the running kernel is
// checked by the call itself (EINVAL means unsupported).
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace iomm::mem {

Status populate_and_lock(void* addr, uint64_t length, bool write) {
  if (madvise(addr, length, write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ) != 0) {
    const int err = errno;
    return Error(pin_errno(err), "cannot fault in " + std::to_string(length) + " bytes at " +
                                     std::to_string(reinterpret_cast<uintptr_t>(addr)) + ": " +
                                     std::strerror(err));
  }
  // The raw syscall: sanitizer runtimes intercept mlock() as a no-op, and the
  // tests check VmLck under ASan and TSan too.
  if (syscall(SYS_mlock, addr, length) != 0) {
    const int err = errno;
    // The range was just faulted in, so ENOMEM here is the kernel's own
    // RLIMIT_MEMLOCK (for a process without CAP_IPC_LOCK), not a bad address.
    const bool limit = err == ENOMEM || err == EPERM || err == EAGAIN;
    return Error(limit ? ENOMEM : pin_errno(err),
                 "mlock of " + std::to_string(length) + " bytes failed: " + std::strerror(err));
  }
  return {};
}

void unlock_range(void* addr, uint64_t length) noexcept { syscall(SYS_munlock, addr, length); }

}  // namespace iomm::mem
