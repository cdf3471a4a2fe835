// Attaching software domains to an IOAS: replay, reservations, alignment,
// all-or-nothing, detach, and translation removal on unmap.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cstring>
#include <vector>

#include "iomm/ioas.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

constexpr uint32_t kRW = kProtRead | kProtWrite;
constexpr uint64_t kMiB = 1 << 20;
using test::Memfd;

std::shared_ptr<SoftDomain> make_domain(DomainConfig c = {}) {
  return SoftDomain::create(c).value();
}

TEST(Attach, ReplaysMappingsIntoEveryDomain) {
  Memfd mfd(8 * kMiB);
  auto ioas = Ioas::create({}).value();
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, 4 * kMiB), kRW, 0x40000000));
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 4 * kMiB, kPageSize), kProtRead, 0x1000));
  auto a = make_domain();
  auto b = make_domain();
  ASSERT_OK(ioas->attach(a));
  ASSERT_OK(ioas->attach(b));
  EXPECT_EQ(ioas->counters().domains, 2U);
  EXPECT_EQ(a->counters().leaves_2m, 2U);  // 2 MiB-aligned IOVA and host address
  EXPECT_EQ(b->counters().mapped_bytes, 4 * kMiB + kPageSize);
  const char msg[] = "through a";
  ASSERT_OK(a->dma_write(0x40000000 + 100, msg, sizeof(msg)));
  char back[sizeof(msg)] = {};
  ASSERT_OK(b->dma_read(0x40000000 + 100, back, sizeof(back)));
  EXPECT_STREQ(back, msg);
  EXPECT_ERRNO(b->dma_write(0x1000, msg, 1), EPERM);
  EXPECT_EQ(counters().pinned_bytes, 4 * kMiB + kPageSize);
  // Detaching one domain keeps the pins; the last one releases them.
  ASSERT_OK(ioas->detach(a));
  EXPECT_ERRNO(a->translate(0x40000000, kProtRead), EFAULT);
  EXPECT_EQ(counters().pinned_bytes, 4 * kMiB + kPageSize);
  ASSERT_OK(ioas->detach(b));
  EXPECT_EQ(counters().pinned_bytes, 0U);
  EXPECT_EQ(ioas->counters().mappings, 2U);
}

TEST(Attach, OneIoasAtATime) {
  auto x = Ioas::create({}).value();
  auto y = Ioas::create({}).value();
  auto d = make_domain();
  ASSERT_OK(x->attach(d));
  EXPECT_ERRNO(x->attach(d), EINVAL);
  EXPECT_ERRNO(y->attach(d), EBUSY);
  EXPECT_ERRNO(y->detach(d), ENOENT);
  EXPECT_ERRNO(x->attach(nullptr), EINVAL);
  ASSERT_OK(x->detach(d));
  ASSERT_OK(y->attach(d));
  ASSERT_OK(y->detach(d));
}

TEST(Attach, ApertureAndReservedRegionsConflictWithMappings) {
  auto ioas = Ioas::create({}).value();
  ASSERT_OK(ioas->map(*MemorySource::simulated(kMiB), kRW, 1ULL << 40));
  DomainConfig small;
  small.aperture_last = (1ULL << 39) - 1;
  auto d = make_domain(small);
  EXPECT_ERRNO(ioas->attach(d), EADDRINUSE);
  DomainConfig msi;
  msi.reserved = {{(1ULL << 40) + kMiB - kPageSize, (1ULL << 40) + kMiB - 1}};
  auto m = make_domain(msi);
  EXPECT_ERRNO(ioas->attach(m), EADDRINUSE);
  // Nothing changed.
  EXPECT_EQ(ioas->iova_ranges(), (std::vector<IovaRange>{{0, UINT64_MAX}}));
  EXPECT_EQ(ioas->counters().domains, 0U);
  EXPECT_EQ(counters().simulated_pinned_bytes, 0U);
  // An allowed range outside the aperture conflicts too.
  ASSERT_OK(ioas->unmap_all());
  const IovaRange allowed[] = {{1ULL << 40, (1ULL << 41) - 1}};
  ASSERT_OK(ioas->set_allowed_ranges(allowed));
  EXPECT_ERRNO(ioas->attach(d), EADDRINUSE);
  ASSERT_OK(ioas->set_allowed_ranges({}));
  ASSERT_OK(ioas->attach(d));
  EXPECT_EQ(ioas->iova_ranges(), (std::vector<IovaRange>{{0, (1ULL << 39) - 1}}));
  EXPECT_ERRNO(ioas->map(*MemorySource::simulated(kMiB), kRW, 1ULL << 40), EINVAL);
  ASSERT_OK(ioas->detach(d));
  EXPECT_EQ(ioas->iova_ranges(), (std::vector<IovaRange>{{0, UINT64_MAX}}));
}

TEST(Attach, ReservedRegionsShapeAllocation) {
  auto ioas = Ioas::create({}).value();
  DomainConfig c;
  c.aperture_start = 0x100000;
  c.reserved = {{0x200000, 0x2FFFFF}};
  auto d = make_domain(c);
  ASSERT_OK(ioas->attach(d));
  auto a = ioas->map(*MemorySource::simulated(kMiB), kRW);
  auto b = ioas->map(*MemorySource::simulated(kMiB), kRW);
  ASSERT_OK(a);
  ASSERT_OK(b);
  EXPECT_EQ(*a, 0x100000U);
  EXPECT_EQ(*b, 0x300000U);
  ASSERT_OK(ioas->unmap_all());
  ASSERT_OK(ioas->detach(d));
}

TEST(Attach, AlignmentConflictIsEaddrinuse) {
  auto ioas = Ioas::create({}).value();
  ASSERT_OK(ioas->map(*MemorySource::simulated(100), kRW, 0x1000));
  auto d = make_domain();
  EXPECT_ERRNO(ioas->attach(d), EADDRINUSE);
  ASSERT_OK(ioas->unmap_all());
  ASSERT_OK(ioas->map(*MemorySource::simulated(kPageSize), kRW, 0x1000));
  DomainConfig big;
  big.min_page_size = 64 * 1024;
  auto b = make_domain(big);
  EXPECT_ERRNO(ioas->attach(b), EADDRINUSE);
  EXPECT_EQ(ioas->counters().iova_alignment, 1U);
  ASSERT_OK(ioas->attach(d));
  EXPECT_EQ(ioas->counters().iova_alignment, kPageSize);
  ASSERT_OK(ioas->unmap_all());
  ASSERT_OK(ioas->attach(b));
  EXPECT_EQ(ioas->counters().iova_alignment, 64U * 1024);
  EXPECT_ERRNO(ioas->map(*MemorySource::simulated(kPageSize), kRW, 0x10000), EINVAL);
  ASSERT_OK(ioas->detach(b));
  EXPECT_EQ(ioas->counters().iova_alignment, kPageSize);
  ASSERT_OK(ioas->detach(d));
}

TEST(Attach, UnmapRemovesTranslationsFromEveryDomain) {
  Memfd mfd(2 * kMiB);
  auto ioas = Ioas::create({}).value();
  auto a = make_domain();
  auto b = make_domain();
  ASSERT_OK(ioas->attach(a));
  ASSERT_OK(ioas->attach(b));
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, 2 * kMiB), kRW, 0x200000));
  ASSERT_OK(a->translate(0x200000, kProtWrite));
  ASSERT_OK(ioas->unmap(0x200000, 2 * kMiB));
  EXPECT_ERRNO(a->translate(0x200000, kProtRead), EFAULT);
  EXPECT_ERRNO(b->translate(0x3FFFFF, kProtRead), EFAULT);
  EXPECT_EQ(a->counters().mapped_bytes, 0U);
  EXPECT_EQ(b->counters().mapped_bytes, 0U);
  char c;
  EXPECT_ERRNO(a->dma_read(0x200000, &c, 1), EFAULT);
  auto faults = a->take_faults();
  ASSERT_FALSE(faults.empty());
  EXPECT_EQ(faults.back().iova, 0x200000U);
  EXPECT_EQ(faults.back().reason, FaultReason::not_present);
  ASSERT_OK(ioas->detach(a));
  ASSERT_OK(ioas->detach(b));
}

TEST(Attach, OneGigabyteLeavesWhenAligned) {
  // 2 GiB of simulated memory: not charged, so that an ordinary user's
  // memlock limit does not refuse it.
  IoasOptions options;
  options.account_mode = AccountMode::none;
  auto ioas = Ioas::create(options).value();
  auto d = make_domain();
  ASSERT_OK(ioas->attach(d));
  // Simulated addresses are 2^47-aligned at offset 0.
  ASSERT_OK(ioas->map(*MemorySource::simulated(2ULL << 30), kRW, 1ULL << 30));
  EXPECT_EQ(d->counters().leaves_1g, 2U);
  auto t = d->translate((1ULL << 30) + 12345, kProtRead);
  ASSERT_OK(t);
  EXPECT_EQ(t->leaf_size, 1ULL << 30);
  EXPECT_EQ(t->host, nullptr);
  char c;
  EXPECT_ERRNO(d->dma_read(1ULL << 30, &c, 1), ENXIO);
  ASSERT_OK(ioas->unmap_all());
  EXPECT_EQ(d->counters().leaves_1g, 0U);
  ASSERT_OK(ioas->detach(d));
}

TEST(Attach, DestroyingTheIoasReleasesEverything) {
  Memfd mfd(kMiB);
  auto d = make_domain();
  {
    auto ioas = Ioas::create({}).value();
    ASSERT_OK(ioas->attach(d));
    ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, kMiB), kRW, 0x100000));
    EXPECT_EQ(counters().pinned_bytes, kMiB);
  }
  EXPECT_EQ(counters().pinned_bytes, 0U);
  EXPECT_ERRNO(d->translate(0x100000, kProtRead), EFAULT);
  auto again = Ioas::create({}).value();
  ASSERT_OK(again->attach(d));  // the domain was released by the destroyed IOAS
  ASSERT_OK(again->detach(d));
}

TEST(Attach, ShrunkFileGivesEfaultNotSigbus) {
  Memfd mfd(2 * kMiB, 0, test::Shrink::allowed);
  auto ioas = Ioas::create({}).value();
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, 2 * kMiB, FileSeal::allow_shrink), kRW,
                      0x200000));
  auto d = make_domain();
  ASSERT_OK(ioas->attach(d));
  ASSERT_OK(ioas->detach(d));  // unpinned again: truncation can now drop the pages
  ASSERT_OK(ioas->attach(d));
  ASSERT_EQ(ftruncate(mfd.fd(), 0), 0);  // mlock does not stop truncation
  char buf[64];
  EXPECT_ERRNO(d->dma_read(0x200000, buf, sizeof(buf)), EFAULT);
  EXPECT_ERRNO(d->dma_write(0x300000, buf, sizeof(buf)), EFAULT);
  ASSERT_OK(ioas->unmap_all());
  ASSERT_OK(ioas->detach(d));
}

}  // namespace
}  // namespace iomm

namespace iomm {
namespace {

TEST(AttachShrunk, PinningPastTheEndOfAShrunkFileIsEfault) {
  test::Memfd mfd(2 * kMiB, 0, test::Shrink::allowed);
  auto ioas = Ioas::create({}).value();
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, 2 * kMiB, FileSeal::allow_shrink), kRW,
                      0x200000));
  ASSERT_EQ(ftruncate(mfd.fd(), kMiB), 0);
  auto d = make_domain();
  EXPECT_ERRNO(ioas->attach(d), EFAULT);
  EXPECT_EQ(counters().pinned_bytes, 0U);
  EXPECT_EQ(process_vmlck_bytes(), 0U);
}

TEST(AttachShrunk, HugetlbPastTheEndIsEfault) {
  IOMM_NEEDS(test::hugetlb_available(4 * kMiB), "2 MiB huge pages (vm.nr_hugepages)");
  test::Memfd huge(4 * kMiB, MFD_HUGETLB, test::Shrink::allowed);
  auto ioas = Ioas::create({}).value();
  auto src = MemorySource::from_file(huge.fd(), 0, 4 * kMiB, FileSeal::allow_shrink);
  ASSERT_OK(src);
  ASSERT_OK(ioas->map(*src, kRW, 0x400000));
  auto d = make_domain();
  ASSERT_OK(ioas->attach(d));
  EXPECT_EQ(counters().pinned_bytes, 4 * kMiB);
  EXPECT_EQ(d->counters().leaves_2m, 2U);
  ASSERT_OK(ioas->detach(d));
  ASSERT_EQ(ftruncate(huge.fd(), 2 * kMiB), 0);
  EXPECT_ERRNO(ioas->attach(d), EFAULT);
  EXPECT_EQ(counters().pinned_bytes, 0U);
}

}  // namespace
}  // namespace iomm
