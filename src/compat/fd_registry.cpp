#include "compat/fd_registry.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <new>
#include <string>

#include "compat/container.hpp"
#include "iomm/vfio_compat.h"

namespace iomm::compat {

FdRegistry::~FdRegistry() {
  for (const auto& [key, fd] : fds_) close(fd);
}

Status FdRegistry::add(int fd) {
  struct stat st {};
  if (fstat(fd, &st) != 0) return Error(EBADF, "fd " + std::to_string(fd) + " is not open");
  if (!S_ISREG(st.st_mode)) return Error(EINVAL, "only regular files can be registered");
  if ((fcntl(fd, F_GETFL) & O_ACCMODE) == O_WRONLY) {
    return Error(EINVAL, "a write-only fd cannot be mapped");
  }
  const int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (own < 0) return Error(errno, "duplicating fd " + std::to_string(fd));
  std::lock_guard lk(mu_);
  try {
    auto [it, inserted] = fds_.try_emplace({st.st_dev, st.st_ino}, own);
    if (!inserted) {
      close(it->second);
      it->second = own;
    }
  } catch (const std::bad_alloc&) {
    close(own);
    return Error(ENOMEM, "out of memory");
  }
  return {};
}

Status FdRegistry::remove(int fd) {
  struct stat st {};
  if (fstat(fd, &st) != 0) return Error(EBADF, "fd " + std::to_string(fd) + " is not open");
  std::lock_guard lk(mu_);
  auto it = fds_.find({st.st_dev, st.st_ino});
  if (it == fds_.end()) return Error(ENOENT, "no fd of this file is registered");
  close(it->second);
  fds_.erase(it);
  return {};
}

std::optional<Result<MemorySource>> FdRegistry::source(uint64_t dev, uint64_t ino, uint64_t offset,
                                                       uint64_t size) const {
  std::lock_guard lk(mu_);
  auto it = fds_.find({dev, ino});
  if (it == fds_.end()) return std::nullopt;
  // As vaddr.cpp: type1 accepts files that may shrink.
  return MemorySource::from_file(it->second, offset, size, FileSeal::allow_shrink);
}

}  // namespace iomm::compat

namespace {

template <typename Op>
int registry_call(iomm_vfio_container* h, int fd, Op op) noexcept {
  if (h == nullptr) {
    errno = EBADF;
    return -1;
  }
  try {
    const iomm::Status s = op(h->c.fds, fd);
    if (s) return 0;
    errno = s.code();
  } catch (const std::bad_alloc&) {
    errno = ENOMEM;
  } catch (...) {
    errno = EIO;
  }
  return -1;
}

}  // namespace

extern "C" {

int iomm_vfio_register_fd(iomm_vfio_container* c, int fd) {
  return registry_call(c, fd, [](iomm::compat::FdRegistry& r, int f) { return r.add(f); });
}

int iomm_vfio_unregister_fd(iomm_vfio_container* c, int fd) {
  return registry_call(c, fd, [](iomm::compat::FdRegistry& r, int f) { return r.remove(f); });
}

}  // extern "C"
