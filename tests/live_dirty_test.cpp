// Core mechanisms under the type1 layer, tested directly: the IOAS dirty
// log, per-page access pins, and live update of host addresses.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cstring>
#include <vector>

#include "iomm/access.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

constexpr uint32_t kRW = kProtRead | kProtWrite;
constexpr uint64_t kMiB = 1 << 20;

struct DirtyFixture : testing::Test {
  test::Memfd mfd{2 * kMiB};
  std::shared_ptr<Ioas> ioas = Ioas::create({}).value();
  std::shared_ptr<SoftDomain> domain = SoftDomain::create({}).value();
  std::shared_ptr<Access> access = Access::create(ioas, [](const IovaRange&) {}).value();
  void SetUp() override {
    ASSERT_OK(ioas->attach(domain));
    ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, 2 * kMiB), kRW, 0x200000));
  }
  void TearDown() override {
    access.reset();
    ASSERT_OK(ioas->unmap_all());
    ASSERT_OK(ioas->detach(domain));
  }
  std::vector<uint64_t> dirty(uint64_t iova, uint64_t length) {
    std::vector<uint64_t> bits((length / kPageSize + 63) / 64);
    EXPECT_OK(ioas->read_and_clear_dirty(iova, length, bits));
    return bits;
  }
};

TEST_F(DirtyFixture, DomainAndAccessWritesAreMarkedExactly) {
  std::vector<uint64_t> bits(8);
  EXPECT_ERRNO(ioas->read_and_clear_dirty(0x200000, 2 * kMiB, bits), EINVAL);  // tracking off
  ioas->set_dirty_tracking(true);
  char buf[16] = {1};
  ASSERT_OK(domain->dma_write(0x200000 + 5 * kPageSize + 100, buf, sizeof(buf)));
  ASSERT_OK(access->write(0x200000 + 70 * kPageSize - 8, buf, sizeof(buf)));  // crosses 69|70
  ASSERT_OK(domain->dma_read(0x200000 + 9 * kPageSize, buf, sizeof(buf)));    // reads don't dirty
  auto d = dirty(0x200000, 2 * kMiB);
  EXPECT_EQ(d[0], 1ULL << 5);
  EXPECT_EQ(d[1], (1ULL << (69 - 64)) | (1ULL << (70 - 64)));
  for (size_t i = 2; i < d.size(); ++i) EXPECT_EQ(d[i], 0U);
  // Read and cleared: a second read is clean.
  d = dirty(0x200000, 2 * kMiB);
  for (uint64_t w : d) EXPECT_EQ(w, 0U);
}

TEST_F(DirtyFixture, PinnedPagesStayDirtyUntilUnpinned) {
  ioas->set_dirty_tracking(true);
  void* host[3];
  ASSERT_OK(access->pin_pages(0x200000 + 10 * kPageSize, 3, kRW, host));
  EXPECT_EQ(dirty(0x200000, 2 * kMiB)[0], 0x7ULL << 10);
  EXPECT_EQ(dirty(0x200000, 2 * kMiB)[0], 0x7ULL << 10);  // still pinned: still dirty
  ASSERT_OK(access->unpin_pages(0x200000 + 10 * kPageSize, 3));
  EXPECT_EQ(dirty(0x200000, 2 * kMiB)[0], 0U);
}

TEST_F(DirtyFixture, ArgumentsAndUnmapClearTheRange) {
  ioas->set_dirty_tracking(true);
  std::vector<uint64_t> small(1);
  EXPECT_ERRNO(ioas->read_and_clear_dirty(0x200000, 2 * kMiB, small), EINVAL);
  EXPECT_ERRNO(ioas->read_and_clear_dirty(0x200800, kPageSize, small), EINVAL);
  EXPECT_ERRNO(ioas->read_and_clear_dirty(0x200000, 0, small), EINVAL);
  EXPECT_ERRNO(ioas->read_and_clear_dirty(UINT64_MAX - kPageSize + 1, 2 * kPageSize, small),
               EOVERFLOW);
  char b = 1;
  ASSERT_OK(domain->dma_write(0x200000, &b, 1));
  ASSERT_OK(ioas->unmap_all());
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, 2 * kMiB), kRW, 0x200000));
  EXPECT_EQ(dirty(0x200000, 2 * kMiB)[0], 0U);  // the unmap cleared it
}

TEST(PagePins, CountedPerPageAndChargedOnce) {
  test::WithoutIpcLock nocap;
  ASSERT_OK(set_memlock_limit(AccountMode::per_process, 0, 8 * kMiB));
  test::Memfd mfd(kMiB);
  auto ioas = Ioas::create({}).value();
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, kMiB), kRW, 0x100000));
  auto access = Access::create(ioas, [](const IovaRange&) {}).value();
  void* host[4];
  ASSERT_OK(access->pin_pages(0x100000, 4, kRW, host));
  ASSERT_OK(access->pin_pages(0x102000, 2, kProtRead, host));  // pages 2, 3 again
  EXPECT_EQ(access->page_pinned_count(), 4U);
  EXPECT_EQ(counters().charged_bytes, 4 * kPageSize);
  EXPECT_ERRNO(access->pin_pages(0x100000, 0, kRW, host), EINVAL);
  EXPECT_ERRNO(access->pin_pages(0x100000, 1, kRW, nullptr), EINVAL);
  EXPECT_ERRNO(access->pin_pages(0x100800, 1, kRW, host), EINVAL);
  EXPECT_ERRNO(access->pin_pages(0x1FF000, 2, kRW, host), ENOENT);
  ASSERT_OK(access->unpin_pages(0x100000, 4));
  EXPECT_EQ(access->page_pinned_count(), 2U);  // pages 2, 3 still held once
  EXPECT_EQ(counters().charged_bytes, 2 * kPageSize);
  EXPECT_ERRNO(access->unpin_pages(0x100000, 1), EINVAL);  // not pinned: nothing changes
  EXPECT_EQ(access->page_pinned_count(), 2U);
  ASSERT_OK(access->unpin_pages(0x102000, 2));
  EXPECT_EQ(counters().charged_bytes, 0U);
}

TEST(LiveUpdate, InvalidateKeepsDmaAndBlocksAccesses) {
  test::Memfd mfd(2 * kMiB);
  auto ioas = Ioas::create({}).value();
  auto domain = SoftDomain::create({}).value();
  ASSERT_OK(ioas->attach(domain));
  auto source = MemorySource::from_file(mfd.fd(), 0, 2 * kMiB).value();
  ASSERT_OK(ioas->map(source, kRW, 0x200000));
  auto access = Access::create(ioas, [](const IovaRange&) {}).value();
  EXPECT_ERRNO(ioas->replace_host(0x200000, source, {}), EINVAL);  // not invalid
  auto bytes = ioas->invalidate_host(0x200000, 2 * kMiB);
  ASSERT_OK(bytes);
  EXPECT_EQ(*bytes, 2 * kMiB);
  EXPECT_EQ(ioas->invalid_host_count(), 1U);
  EXPECT_ERRNO(ioas->invalidate_host(0x200000, 2 * kMiB), EINVAL);  // already invalid
  char b = 'v';
  ASSERT_OK(domain->dma_write(0x200010, &b, 1));  // DMA keeps working
  EXPECT_ERRNO(access->pin(0x200000, kPageSize, kRW), EBUSY);
  EXPECT_ERRNO(access->read(0x200000, &b, 1), EBUSY);
  EXPECT_ERRNO(ioas->replace_host(0x200000, source.slice(0, kMiB), {}), EINVAL);  // length
  EXPECT_ERRNO(ioas->replace_host(0x300000, source, {}), ENOENT);
  ASSERT_OK(ioas->replace_host(0x200000, source, {}));
  EXPECT_EQ(ioas->invalid_host_count(), 0U);
  char back = 0;
  ASSERT_OK(access->read(0x200010, &back, 1));
  EXPECT_EQ(back, 'v');
  access.reset();
  ASSERT_OK(ioas->unmap_all());
  ASSERT_OK(ioas->detach(domain));
}

// The new backing must fit the IOAS's alignment as map() requires: with an
// access attached (4 KiB) and no domain, a source at an unaligned address
// would otherwise be installed, breaking what accesses rely on.
TEST(LiveUpdate, MisalignedNewBackingIsRefusedAndChangesNothing) {
  test::Memfd mfd(2 * kMiB);
  auto ioas = Ioas::create({}).value();
  auto source = MemorySource::from_file(mfd.fd(), 0, 2 * kMiB).value();
  ASSERT_OK(ioas->map(source, kRW, 0x200000));
  auto access = Access::create(ioas, [](const IovaRange&) {}).value();
  ASSERT_EQ(ioas->counters().iova_alignment, kPageSize);
  ASSERT_OK(ioas->invalidate_host(0x200000, 2 * kMiB));
  std::vector<char> user(2 * kMiB + kPageSize);
  const uint64_t base =
      (reinterpret_cast<uint64_t>(user.data()) + kPageSize - 1) & ~(kPageSize - 1);
  auto misaligned = MemorySource::from_user(reinterpret_cast<void*>(base + 16), 2 * kMiB).value();
  EXPECT_ERRNO(ioas->replace_host(0x200000, misaligned, {}), EINVAL);
  EXPECT_EQ(ioas->invalid_host_count(), 1U);
  EXPECT_EQ(counters().pinned_bytes, 0U);
  EXPECT_EQ(counters().charged_bytes, 0U);
  ASSERT_OK(ioas->replace_host(0x200000, source, {}));  // the aligned one still works
  EXPECT_EQ(ioas->invalid_host_count(), 0U);
  access.reset();
  ASSERT_OK(ioas->unmap_all());
}

TEST(LiveUpdate, NewPagesArePinnedBeforeTheOldAreReleased) {
  auto* a = static_cast<char*>(
      mmap(nullptr, kMiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  auto* b = static_cast<char*>(
      mmap(nullptr, kMiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(a, MAP_FAILED);
  ASSERT_NE(b, MAP_FAILED);
  auto ioas = Ioas::create({}).value();
  auto domain = SoftDomain::create({}).value();
  ASSERT_OK(ioas->attach(domain));
  ASSERT_OK(ioas->map(*MemorySource::from_user(a, kMiB), kRW, 0x100000));
  ASSERT_OK(ioas->invalidate_host(0x100000, kMiB));
  std::memset(b, 'n', kMiB);
  ASSERT_OK(ioas->replace_host(0x100000, *MemorySource::from_user(b, kMiB), {}));
  EXPECT_EQ(counters().pinned_bytes, kMiB);  // only the new pages
  char c = 0;
  ASSERT_OK(domain->dma_read(0x100000 + 77, &c, 1));
  EXPECT_EQ(c, 'n');  // domains now reach the new memory
  ASSERT_OK(ioas->unmap_all());
  ASSERT_OK(ioas->detach(domain));
  munmap(a, kMiB);
  munmap(b, kMiB);
}

}  // namespace
}  // namespace iomm
