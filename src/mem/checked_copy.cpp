#include "mem/checked_copy.hpp"

#include <sys/uio.h>
#include <unistd.h>

#include <cstddef>

namespace iomm::mem {

namespace {

bool transfer(void* local, uint64_t remote, size_t n, bool write) noexcept {
  const pid_t self = getpid();
  while (n > 0) {
    iovec mine{local, n};
    iovec theirs{reinterpret_cast<void*>(remote), n};
    const ssize_t done = write ? process_vm_writev(self, &mine, 1, &theirs, 1, 0)
                               : process_vm_readv(self, &mine, 1, &theirs, 1, 0);
    if (done <= 0) return false;
    local = static_cast<std::byte*>(local) + done;
    remote += static_cast<uint64_t>(done);
    n -= static_cast<size_t>(done);
  }
  return true;
}

}  // namespace

bool checked_read(void* buf, uint64_t address, size_t n) noexcept {
  return transfer(buf, address, n, false);
}

bool checked_write(uint64_t address, const void* buf, size_t n) noexcept {
  return transfer(const_cast<void*>(buf), address, n, true);
}

}  // namespace iomm::mem
