// Anonymous memory registered with userfaultfd whose missing-page faults are
// left pending until the test resolves them: a pin of it blocks inside its
// populate/mlock, standing for a slow (huge) or stuck pin.
#pragma once

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>

namespace iomm::test {

class UserfaultRegion {
 public:
  explicit UserfaultRegion(size_t length) : length_(length) {
    // Faults taken inside the kernel (populate, mlock) must reach us, so
    // UFFD_USER_MODE_ONLY cannot be used: this needs
    // vm.unprivileged_userfaultfd=1 or CAP_SYS_PTRACE.
    uffd_ = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
    if (uffd_ < 0) return;
    uffdio_api api{.api = UFFD_API, .features = 0, .ioctls = 0};
    if (ioctl(uffd_, UFFDIO_API, &api) != 0) return;
    addr_ = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (addr_ == MAP_FAILED) return;
    uffdio_register reg{};
    reg.range = {reinterpret_cast<uint64_t>(addr_), length};
    reg.mode = UFFDIO_REGISTER_MODE_MISSING;
    ok_ = ioctl(uffd_, UFFDIO_REGISTER, &reg) == 0;
  }
  ~UserfaultRegion() {
    if (addr_ != MAP_FAILED && addr_ != nullptr) munmap(addr_, length_);
    if (uffd_ >= 0) close(uffd_);
  }
  UserfaultRegion(const UserfaultRegion&) = delete;
  UserfaultRegion& operator=(const UserfaultRegion&) = delete;

  [[nodiscard]] bool ok() const { return ok_; }
  [[nodiscard]] void* addr() const { return addr_; }
  // Wait for the first fault (bounded), without resolving it.
  bool wait_fault(int timeout_ms) {
    pollfd p{uffd_, POLLIN, 0};
    return poll(&p, 1, timeout_ms) == 1;
  }
  // Resolve every missing page with zeros.
  void resolve_all() {
    uffdio_zeropage zero{};
    zero.range = {reinterpret_cast<uint64_t>(addr_), length_};
    ioctl(uffd_, UFFDIO_ZEROPAGE, &zero);
  }

 private:
  size_t length_;
  int uffd_ = -1;
  void* addr_ = nullptr;
  bool ok_ = false;
};

}  // namespace iomm::test
