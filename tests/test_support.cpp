#include "test_support.hpp"

#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <linux/capability.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string_view>

namespace iomm::test {

Memfd::Memfd(uint64_t size, unsigned flags, Shrink shrink) {
  const bool sealed = shrink == Shrink::sealed;
  fd_ = memfd_create("iomm-test", MFD_CLOEXEC | flags | (sealed ? MFD_ALLOW_SEALING : 0U));
  if (fd_ < 0) throw std::runtime_error("memfd_create failed");
  if (ftruncate(fd_, static_cast<off_t>(size)) != 0) {
    close(fd_);
    throw std::runtime_error("ftruncate failed");
  }
  if (sealed && fcntl(fd_, F_ADD_SEALS, F_SEAL_SHRINK) != 0) {
    close(fd_);
    throw std::runtime_error("F_ADD_SEALS failed");
  }
}

Memfd::~Memfd() { close(fd_); }

namespace {

bool set_ipc_lock(bool on) {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};
  if (syscall(SYS_capget, &header, data) != 0) return false;
  const bool had = (data[CAP_TO_INDEX(CAP_IPC_LOCK)].effective & CAP_TO_MASK(CAP_IPC_LOCK)) != 0;
  if (on) {
    data[CAP_TO_INDEX(CAP_IPC_LOCK)].effective |= CAP_TO_MASK(CAP_IPC_LOCK);
  } else {
    data[CAP_TO_INDEX(CAP_IPC_LOCK)].effective &= ~CAP_TO_MASK(CAP_IPC_LOCK);
  }
  syscall(SYS_capset, &header, data);
  return had;
}

}  // namespace

WithoutIpcLock::WithoutIpcLock() : had_(set_ipc_lock(false)) {}
WithoutIpcLock::~WithoutIpcLock() {
  if (had_) set_ipc_lock(true);
}

bool hugetlb_available(uint64_t size) {
  const int fd = memfd_create("iomm-huge-probe", MFD_CLOEXEC | MFD_HUGETLB);
  if (fd < 0) return false;
  bool ok = ftruncate(fd, static_cast<off_t>(size)) == 0;
  if (ok) {
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    ok = p != MAP_FAILED && madvise(p, size, 23 /* MADV_POPULATE_WRITE */) == 0;
    if (p != MAP_FAILED) munmap(p, size);
  }
  close(fd);
  return ok;
}

bool require_all() {
  const char* all = std::getenv("IOMM_REQUIRE_ALL");
  const char* ci = std::getenv("CI");
  return (all != nullptr && std::string_view(all) == "1") ||
         (ci != nullptr && std::string_view(ci) == "true");
}

bool is_root() { return geteuid() == 0; }

bool can_reopen_map_files() {
  const size_t len = 4096;
  void* p = mmap(nullptr, len, PROT_READ, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return false;
  char path[80];
  const auto start = reinterpret_cast<uintptr_t>(p);
  std::snprintf(path, sizeof(path), "/proc/self/map_files/%" PRIxPTR "-%" PRIxPTR, start,
                start + len);
  const int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd >= 0) close(fd);
  munmap(p, len);
  return fd >= 0;
}

int run_unprivileged(const std::function<void()>& body) {
  std::fflush(stdout);
  const pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    constexpr uid_t kNobody = 65534;
    if (geteuid() == 0 &&
        (setgroups(0, nullptr) != 0 || setresgid(kNobody, kNobody, kNobody) != 0 ||
         setresuid(kNobody, kNobody, kNobody) != 0)) {
      _exit(100);
    }
    // Credentials changed, so the kernel made /proc/self root-owned; an
    // ordinary process is dumpable.
    prctl(PR_SET_DUMPABLE, 1);
    __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};
    if (syscall(SYS_capget, &header, data) != 0 || data[0].effective != 0 ||
        data[1].effective != 0) {
      _exit(101);
    }
    body();
    std::fflush(stdout);
    _exit(testing::Test::HasFailure() ? 1 : 0);
  }
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace iomm::test
