// External domains of an IOAS (include/iomm/external_domain.hpp) and the
// kernel VFIO domain on a machine without VFIO (include/iomm/kernel_vfio.hpp).
// The kernel domain itself runs against the real kernel in the guest stage
// (tests/guest/); here only what this host can show honestly.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#include "iomm/accounting.hpp"
#include "iomm/ioas.hpp"
#include "iomm/kernel_vfio.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

// An external domain that records what the IOAS asks of it, and fails the
// map whose number equals fail_at (1-based) with fail_code.
class RecordingDomain : public ExternalDomain {
 public:
  explicit RecordingDomain(ExternalGeometry g) : geometry_(std::move(g)) {}
  Result<ExternalGeometry> geometry() override { return geometry_; }
  Status map(uint64_t iova, void* host, uint64_t length, uint32_t prot) override {
    std::lock_guard lk(mu);
    if (++maps == fail_at) return Error(fail_code, "refused by the test");
    EXPECT_TRUE(mapped.emplace(iova, Entry{host, length, prot}).second);
    return {};
  }
  void unmap(uint64_t iova, uint64_t length) noexcept override {
    std::lock_guard lk(mu);
    auto it = mapped.find(iova);
    if (it == mapped.end()) return;  // not mapped: harmless by contract
    EXPECT_EQ(it->second.length, length);
    mapped.erase(it);
  }

  struct Entry {
    void* host;
    uint64_t length;
    uint32_t prot;
  };
  std::mutex mu;
  std::map<uint64_t, Entry> mapped;
  int maps = 0;
  int fail_at = 0;
  int fail_code = ENOMEM;

 private:
  ExternalGeometry geometry_;
};

ExternalGeometry x86_like() {
  return {{{0, 0xfedfffffULL}, {0xfef00000ULL, (1ULL << 39) - 1}}, 4096};
}

struct UserBuffer {
  explicit UserBuffer(size_t n) : length(n) {
    p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  }
  ~UserBuffer() { ::munmap(p, length); }
  UserBuffer(const UserBuffer&) = delete;
  UserBuffer& operator=(const UserBuffer&) = delete;
  MemorySource source() const { return MemorySource::from_user(p, length).value(); }
  void* p;
  size_t length;
};

TEST(ExternalDomain, AttachMapsExistingMappingsAndPinsNothing) {
  auto ioas = Ioas::create().value();
  UserBuffer buf(8 << 12);
  ASSERT_EQ(ioas->map(buf.source(), kProtRead, 0x100000).value(), 0x100000U);
  auto d = std::make_shared<RecordingDomain>(x86_like());
  ASSERT_TRUE(ioas->attach_external(d).ok());
  ASSERT_EQ(d->mapped.size(), 1U);
  EXPECT_EQ(d->mapped.at(0x100000).host, buf.p);
  EXPECT_EQ(d->mapped.at(0x100000).length, 8U << 12);
  EXPECT_EQ(d->mapped.at(0x100000).prot, kProtRead);
  // The domain pins for itself: iomm pinned and charged nothing.
  const Counters c = counters();
  EXPECT_EQ(c.pinned_bytes, 0U);
  EXPECT_EQ(c.charged_bytes, 0U);
  EXPECT_FALSE(ioas->mappings().at(0).pinned);
  // Its holes are reserved; its page size is the IOAS's alignment.
  EXPECT_EQ(ioas->iova_ranges(), x86_like().usable);
  EXPECT_EQ(ioas->counters().iova_alignment, 4096U);
  EXPECT_EQ(ioas->attach_external(d).error().code(), EINVAL);
}

TEST(ExternalDomain, MapAndUnmapReachTheDomain) {
  auto ioas = Ioas::create().value();
  auto d = std::make_shared<RecordingDomain>(x86_like());
  ASSERT_TRUE(ioas->attach_external(d).ok());
  UserBuffer buf(4 << 12);
  ASSERT_TRUE(ioas->map(buf.source(), kProtRead | kProtWrite, 0x200000).ok());
  EXPECT_EQ(d->mapped.count(0x200000), 1U);
  EXPECT_EQ(ioas->map(buf.source(), kProtRead, 0xfee00000ULL).error().code(), EINVAL);
  EXPECT_EQ(ioas->unmap(0x200000, 4 << 12).value(), 4U << 12);
  EXPECT_TRUE(d->mapped.empty());
}

TEST(ExternalDomain, MapErrorComesBackUnchangedAndLeavesNothing) {
  auto ioas = Ioas::create().value();
  auto soft = SoftDomain::create({}).value();
  ASSERT_TRUE(ioas->attach(soft).ok());
  auto d = std::make_shared<RecordingDomain>(x86_like());
  ASSERT_TRUE(ioas->attach_external(d).ok());
  d->fail_at = 1;
  d->fail_code = EFAULT;
  UserBuffer buf(4 << 12);
  EXPECT_EQ(ioas->map(buf.source(), kProtRead, 0x300000).error().code(), EFAULT);
  EXPECT_TRUE(ioas->mappings().empty());
  EXPECT_TRUE(d->mapped.empty());
  EXPECT_EQ(counters().pinned_bytes, 0U);
  EXPECT_EQ(soft->counters().mapped_bytes, 0U);
}

TEST(ExternalDomain, SecondDomainFailingUndoesTheFirst) {
  auto ioas = Ioas::create().value();
  auto a = std::make_shared<RecordingDomain>(x86_like());
  auto b = std::make_shared<RecordingDomain>(x86_like());
  ASSERT_TRUE(ioas->attach_external(a).ok());
  ASSERT_TRUE(ioas->attach_external(b).ok());
  b->fail_at = 1;
  UserBuffer buf(4 << 12);
  EXPECT_EQ(ioas->map(buf.source(), kProtRead, 0x300000).error().code(), ENOMEM);
  EXPECT_TRUE(a->mapped.empty());
  EXPECT_TRUE(ioas->mappings().empty());
}

TEST(ExternalDomain, AttachFailureLeavesNothing) {
  auto ioas = Ioas::create().value();
  UserBuffer one(4 << 12);
  UserBuffer two(4 << 12);
  ASSERT_TRUE(ioas->map(one.source(), kProtRead, 0x100000).ok());
  ASSERT_TRUE(ioas->map(two.source(), kProtRead, 0x200000).ok());
  auto d = std::make_shared<RecordingDomain>(x86_like());
  d->fail_at = 2;
  EXPECT_EQ(ioas->attach_external(d).error().code(), ENOMEM);
  EXPECT_TRUE(d->mapped.empty());
  EXPECT_EQ(ioas->iova_ranges(), (std::vector<IovaRange>{{0, UINT64_MAX}}));
  EXPECT_EQ(ioas->detach_external(d).error().code(), ENOENT);
}

TEST(ExternalDomain, AttachRefusesMappingsOutsideItsRanges) {
  auto ioas = Ioas::create().value();
  UserBuffer buf(4 << 12);
  ASSERT_TRUE(ioas->map(buf.source(), kProtRead, 0xfee00000ULL).ok());
  auto d = std::make_shared<RecordingDomain>(x86_like());
  EXPECT_EQ(ioas->attach_external(d).error().code(), EADDRINUSE);
  EXPECT_EQ(d->maps, 0);
  auto huge = std::make_shared<RecordingDomain>(ExternalGeometry{{{0, UINT64_MAX}}, 1 << 21});
  EXPECT_EQ(ioas->attach_external(huge).error().code(), EADDRINUSE);
}

TEST(ExternalDomain, DetachUnmapsEverythingAndDropsReservations) {
  auto ioas = Ioas::create().value();
  auto d = std::make_shared<RecordingDomain>(x86_like());
  ASSERT_TRUE(ioas->attach_external(d).ok());
  UserBuffer buf(4 << 12);
  ASSERT_TRUE(ioas->map(buf.source(), kProtRead, 0x100000).ok());
  ASSERT_TRUE(ioas->detach_external(d).ok());
  EXPECT_TRUE(d->mapped.empty());
  EXPECT_EQ(ioas->mappings().size(), 1U);
  EXPECT_EQ(ioas->iova_ranges(), (std::vector<IovaRange>{{0, UINT64_MAX}}));
  EXPECT_EQ(ioas->counters().iova_alignment, 1U);
}

TEST(ExternalDomain, DestroyingTheIoasUnmapsFromTheDomain) {
  auto d = std::make_shared<RecordingDomain>(x86_like());
  UserBuffer buf(4 << 12);
  {
    auto ioas = Ioas::create().value();
    ASSERT_TRUE(ioas->attach_external(d).ok());
    ASSERT_TRUE(ioas->map(buf.source(), kProtRead, 0x100000).ok());
  }
  EXPECT_TRUE(d->mapped.empty());
  EXPECT_EQ(d.use_count(), 1);
}

TEST(ExternalDomain, LiveUpdateToOtherMemoryIsRefused) {
  auto ioas = Ioas::create().value();
  auto d = std::make_shared<RecordingDomain>(x86_like());
  ASSERT_TRUE(ioas->attach_external(d).ok());
  UserBuffer one(4 << 12);
  UserBuffer two(4 << 12);
  ASSERT_TRUE(ioas->map(one.source(), kProtRead, 0x100000).ok());
  ASSERT_EQ(ioas->invalidate_host(0x100000, 4 << 12).value(), 4U << 12);
  EXPECT_EQ(ioas->replace_host(0x100000, two.source(), {}).error().code(), EOPNOTSUPP);
  EXPECT_EQ(d->mapped.at(0x100000).host, one.p);
  EXPECT_EQ(ioas->invalid_host_count(), 1U);
}

TEST(ExternalDomain, SimulatedMemoryHasNoHostAddressForTheKernel) {
  auto ioas = Ioas::create().value();
  auto d = std::make_shared<RecordingDomain>(x86_like());
  ASSERT_TRUE(ioas->attach_external(d).ok());
  ASSERT_TRUE(ioas->map(MemorySource::simulated(4 << 12).value(), kProtRead, 0x100000).ok());
  EXPECT_EQ(d->mapped.at(0x100000).host, nullptr);
}

// The kernel domain on this host: only what the absence of VFIO shows.
TEST(KernelVfio, NoVfioHereIsEnoent) {
  if (::access("/dev/vfio/vfio", F_OK) == 0) {
    GTEST_SKIP() << "this machine has /dev/vfio/vfio; the guest stage covers the kernel domain";
  }
  auto d = KernelVfioDomain::open(0);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.error().code(), ENOENT);
  EXPECT_NE(d.error().message().find("/dev/vfio/vfio"), std::string::npos);
}

TEST(KernelVfio, MissingDeviceDirectoryIsEnoentAndNegativeGroupEinval) {
  auto d = KernelVfioDomain::open(3, "/nonexistent-iomm-vfio-dir");
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.error().code(), ENOENT);
  EXPECT_EQ(KernelVfioDomain::open(-1).error().code(), EINVAL);
}

}  // namespace
}  // namespace iomm
