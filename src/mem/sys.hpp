// The fallible system calls of the memory layer, each a fault-injection
// point (src/fault/inject.hpp). An injected failure sets errno as the real
// call would and returns its error value.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>

#include "fault/inject.hpp"

namespace iomm::mem::sys {

inline void* mmap(void* addr, size_t length, int prot, int flags, int fd, off_t offset) {
  if (IOMM_INJECT("mem.mmap")) {
    errno = ENOMEM;
    return MAP_FAILED;
  }
  return ::mmap(addr, length, prot, flags, fd, offset);
}

inline int madvise(void* addr, size_t length, int advice) {
  if (IOMM_INJECT("mem.madvise")) {
    errno = EFAULT;
    return -1;
  }
  return ::madvise(addr, length, advice);
}

// The raw syscall: sanitizer runtimes replace mlock() with a no-op, and the
// tests check VmLck under ASan and TSan too.
inline int mlock(const void* addr, size_t length) {
  if (IOMM_INJECT("mem.mlock")) {
    errno = ENOMEM;
    return -1;
  }
  return static_cast<int>(::syscall(SYS_mlock, addr, length));
}

inline int mincore(void* addr, size_t length, unsigned char* vec) {
  if (IOMM_INJECT("mem.mincore")) {
    errno = ENOMEM;
    return -1;
  }
  return ::mincore(addr, length, vec);
}

inline int fstat(int fd, struct stat* st) {
  if (IOMM_INJECT("mem.fstat")) {
    errno = EIO;
    return -1;
  }
  return ::fstat(fd, st);
}

inline int dup_cloexec(int fd) {
  if (IOMM_INJECT("mem.dup")) {
    errno = EMFILE;
    return -1;
  }
  return ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
}

}  // namespace iomm::mem::sys
