// A map whose pinning is stuck (here: blocked in a userfaultfd fault, as a
// slow or huge populate would be) must not stop maps, unmaps, translations
// and access pins of disjoint ranges: the fill runs outside the tree lock.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <thread>

#include "iomm/access.hpp"
#include "test_support.hpp"
#include "userfault_region.hpp"

namespace iomm {
namespace {

constexpr uint32_t kRW = kProtRead | kProtWrite;

using test::UserfaultRegion;

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
