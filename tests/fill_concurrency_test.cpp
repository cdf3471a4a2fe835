// A map whose pinning is stuck (here: blocked in a userfaultfd fault, as a
// slow or huge populate would be) must not stop maps, unmaps, translations
// and access pins of disjoint ranges: the fill runs outside the tree lock.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <thread>

#include "iomm/access.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

constexpr uint32_t kRW = kProtRead | kProtWrite;

class UserfaultRegion {
 public:
  explicit UserfaultRegion(size_t length) : length_(length) {
    uffd_ = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
    if (uffd_ < 0) return;
    uffdio_api api{.api = UFFD_API, .features = 0, .ioctls = 0};
    if (ioctl(uffd_, UFFDIO_API, &api) != 0) return;
    addr_ = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uffdio_register reg{};
    reg.range = {reinterpret_cast<uint64_t>(addr_), length};
    reg.mode = UFFDIO_REGISTER_MODE_MISSING;
    ok_ = addr_ != MAP_FAILED && ioctl(uffd_, UFFDIO_REGISTER, &reg) == 0;
  }
  ~UserfaultRegion() {
    if (addr_ != MAP_FAILED && addr_ != nullptr) munmap(addr_, length_);
    if (uffd_ >= 0) close(uffd_);
  }
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

TEST(FillConcurrency, StuckPinDoesNotBlockDisjointWork) {
  UserfaultRegion stuck(16 * kPageSize);
  // The pin faults from the kernel (mlock, MADV_POPULATE), which
  // UFFD_USER_MODE_ONLY does not catch: ordinary users need
  // vm.unprivileged_userfaultfd=1.
  IOMM_NEEDS(stuck.ok(),
             "userfaultfd for kernel-mode faults (vm.unprivileged_userfaultfd=1 when not root)");
  auto ioas = Ioas::create({}).value();
  auto domain = SoftDomain::create({}).value();
  ASSERT_OK(ioas->attach(domain));
  test::Memfd mfd(1 << 20);
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, 1 << 20), kRW, 0x100000));
  auto access = Access::create(ioas, [](const IovaRange&) {}).value();

  std::atomic<bool> stuck_map_done{false};
  Result<uint64_t> stuck_result = Error(EINPROGRESS, "");
  std::thread mapper([&] {
    stuck_result =
        ioas->map(*MemorySource::from_user(stuck.addr(), 16 * kPageSize), kRW, 0x40000000);
    stuck_map_done = true;
  });
  ASSERT_TRUE(stuck.wait_fault(10000)) << "the pin never faulted";
  EXPECT_FALSE(stuck_map_done.load());

  // While that map is stuck in its fill:
  ASSERT_OK(ioas->map(*MemorySource::simulated(1 << 20), kRW, 0x800000));  // another map
  ASSERT_OK(domain->translate(0x100000, kProtRead));                       // translation
  auto pin = access->pin(0x100000, kPageSize, kRW);                        // an access pin
  ASSERT_OK(pin);
  ASSERT_OK(access->unpin(0x100000, kPageSize));
  ASSERT_OK(ioas->unmap(0x800000, 1 << 20));                     // another unmap
  EXPECT_ERRNO(ioas->unmap(0x40000000, 16 * kPageSize), EBUSY);  // but not of it
  EXPECT_ERRNO(ioas->map(*MemorySource::simulated(kPageSize), kRW, 0x40000000), EEXIST);
  EXPECT_FALSE(stuck_map_done.load());

  stuck.resolve_all();
  mapper.join();
  ASSERT_OK(stuck_result);
  ASSERT_OK(domain->translate(0x40000000, kProtWrite));
  access.reset();
  ASSERT_OK(ioas->unmap_all());
  ASSERT_OK(ioas->detach(domain));
}

}  // namespace
}  // namespace iomm
