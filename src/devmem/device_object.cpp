#include "devmem/device_object.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <new>

#include "iomm/signals.hpp"
#include "mem/safe_copy.hpp"

namespace iomm::devmem {

Result<std::shared_ptr<DeviceObject>> DeviceObject::create(int fd, uint64_t size, bool registered) {
  // Copies into the mapping rely on the SIGBUS handler once it is revoked.
  install_signal_handlers();
  const int own_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (own_fd < 0) return Error(errno, "dup of pool memory");
  void* base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, own_fd, 0);
  if (base == MAP_FAILED) {
    const int err = errno;
    close(own_fd);
    return Error(err, "mmap of pool memory");
  }
  try {
    return std::make_shared<DeviceObject>(own_fd, static_cast<std::byte*>(base), size, registered);
  } catch (const std::bad_alloc&) {
    munmap(base, size);
    close(own_fd);
    return Error(ENOMEM, "out of memory for a pool memory object");
  }
}

DeviceObject::~DeviceObject() {
  munmap(base_, size_);
  close(fd_);
}

bool DeviceObject::present(uint64_t offset, uint64_t length) const noexcept {
  uint64_t end = 0;
  if (__builtin_add_overflow(offset, length, &end) || end > size_) return false;
  struct stat st {};
  return ::fstat(fd_, &st) == 0 && static_cast<uint64_t>(st.st_size) >= end;
}

bool DeviceObject::copy_out(uint64_t offset, void* buf, size_t n) const noexcept {
  return mem::safe_copy(buf, base_ + offset, n);
}

bool DeviceObject::copy_in(uint64_t offset, const void* buf, size_t n) const noexcept {
  return mem::safe_copy(base_ + offset, buf, n);
}

Status DeviceObject::lock_granules(uint64_t, uint64_t, bool) {
  if (!registered_) {
    return Error(EPERM,
                 "long-term pin of P2P pool memory refused: the pinner must register for "
                 "revocation (P2pAllocation::map_into)");
  }
  return {};
}

}  // namespace iomm::devmem
