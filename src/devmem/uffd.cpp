#include "devmem/uffd.hpp"

#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>

namespace iomm::devmem {

namespace {

int open_raw(int flags) noexcept {
  int fd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | flags));
  if (fd < 0 && errno == EPERM) {
    fd = static_cast<int>(
        syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | flags | UFFD_USER_MODE_ONLY));
  }
  return fd;
}

Result<uint64_t> probe() noexcept {
  const int fd = open_raw(0);
  if (fd < 0) return Error(errno, "userfaultfd");
  uffdio_api api{.api = UFFD_API, .features = 0, .ioctls = 0};
  const int rc = ioctl(fd, UFFDIO_API, &api);
  const int err = errno;
  close(fd);
  if (rc != 0) return Error(err, "UFFDIO_API");
  return static_cast<uint64_t>(api.features);
}

}  // namespace

Result<uint64_t> kernel_features() noexcept {
  static const Result<uint64_t> features = probe();
  return features;
}

Result<Uffd> open_minor_uffd() noexcept {
  const Result<uint64_t> offered = kernel_features();
  if (!offered.ok()) {
    return Error(offered.code(),
                 "userfaultfd is not available (vm.unprivileged_userfaultfd=0 "
                 "and no CAP_SYS_PTRACE?)");
  }
  if ((*offered & UFFD_FEATURE_MINOR_SHMEM) == 0) {
    return Error(ENOTSUP, "the kernel has no userfaultfd minor faults on shmem");
  }
  const uint64_t want = UFFD_FEATURE_MINOR_SHMEM | (*offered & UFFD_FEATURE_POISON);
  const int fd = open_raw(0);
  if (fd < 0) return Error(errno, "userfaultfd");
  uffdio_api api{.api = UFFD_API, .features = want, .ioctls = 0};
  if (ioctl(fd, UFFDIO_API, &api) != 0) {
    const int err = errno;
    close(fd);
    return Error(err, "UFFDIO_API");
  }
  return Uffd{fd, want};
}

}  // namespace iomm::devmem
