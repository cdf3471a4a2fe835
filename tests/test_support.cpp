#include "test_support.hpp"

#include <linux/capability.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <stdexcept>
#include <string_view>

namespace iomm::test {

Memfd::Memfd(uint64_t size, unsigned flags) {
  fd_ = memfd_create("iomm-test", MFD_CLOEXEC | flags);
  if (fd_ < 0) throw std::runtime_error("memfd_create failed");
  if (ftruncate(fd_, static_cast<off_t>(size)) != 0) {
    close(fd_);
    throw std::runtime_error("ftruncate failed");
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

}  // namespace iomm::test
