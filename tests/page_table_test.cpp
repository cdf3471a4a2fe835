#include "domain/page_table.hpp"

#include <gtest/gtest.h>

#include <cerrno>
#include <cstdint>
#include <memory>

#include "iomm/domain.hpp"
#include "test_support.hpp"

namespace iomm::domain {
namespace {

constexpr uint64_t k4K = kPageSize;
constexpr uint64_t k2M = kPageSize2M;
constexpr uint64_t k1G = kPageSize1G;
constexpr uint64_t kAllSizes = k4K | k2M | k1G;
constexpr uint32_t kReadWrite = kProtRead | kProtWrite;
constexpr uint64_t k48BitLast = (uint64_t{1} << 48) - 1;

std::unique_ptr<PageTable> make_table(uint64_t aperture_last = k48BitLast,
                                      uint64_t page_sizes = kAllSizes) {
  auto table = PageTable::create(aperture_last, page_sizes);
  EXPECT_TRUE(table.ok());
  return std::move(table).value();
}

Leaf lookup_or_fail(const PageTable& table, uint64_t iova) {
  Leaf leaf;
  EXPECT_TRUE(table.lookup(iova, &leaf)) << std::hex << iova;
  return leaf;
}

TEST(PageTable, LevelsCoverTheAperture) {
  EXPECT_EQ(make_table(k48BitLast)->levels(), 4U);
  EXPECT_EQ(make_table(UINT64_MAX)->levels(), 6U);
  EXPECT_EQ(make_table((uint64_t{1} << 39) - 1)->levels(), 3U);
  EXPECT_EQ(make_table(uint64_t{1} << 39)->levels(), 4U);
  EXPECT_EQ(make_table(0xFFF)->levels(), 1U);
}

TEST(PageTable, CreateRejectsBadPageSizes) {
  EXPECT_ERRNO(PageTable::create(k48BitLast, k2M | k1G), EINVAL);
  EXPECT_ERRNO(PageTable::create(k48BitLast, k4K | 8192), EINVAL);
  EXPECT_ERRNO(PageTable::create(k48BitLast, 0), EINVAL);
}

TEST(PageTable, OneGigabyteLeafWhenIovaAndAddressAligned) {
  auto table = make_table();
  ASSERT_OK(table->map(3 * k1G, 5 * k1G, k1G, kReadWrite, mem::HostAccess::direct));
  const PageTableCounters counters = table->counters();
  EXPECT_EQ(counters.leaves_1g, 1U);
  EXPECT_EQ(counters.leaves_2m, 0U);
  EXPECT_EQ(counters.leaves_4k, 0U);
  EXPECT_EQ(counters.mapped_bytes, k1G);

  const Leaf leaf = lookup_or_fail(*table, 3 * k1G + 12345);
  EXPECT_EQ(leaf.size, k1G);
  EXPECT_EQ(leaf.address, 5 * k1G + 12345);
  EXPECT_EQ(leaf.remaining, k1G - 12345);
  EXPECT_EQ(leaf.prot, kReadWrite);
  EXPECT_EQ(leaf.host_access, mem::HostAccess::direct);
}

TEST(PageTable, TwoMegabyteLeafWhenOnlyTwoMegabyteAligned) {
  auto table = make_table();
  // iova is 1 GiB aligned but the address only 2 MiB aligned.
  ASSERT_OK(table->map(k1G, k1G + k2M, k1G, kProtRead, mem::HostAccess::direct));
  EXPECT_EQ(table->counters().leaves_2m, 512U);
  EXPECT_EQ(table->counters().leaves_1g, 0U);

  const Leaf leaf = lookup_or_fail(*table, k1G + 3 * k2M + 5);
  EXPECT_EQ(leaf.size, k2M);
  EXPECT_EQ(leaf.address, k1G + 4 * k2M + 5);
  EXPECT_EQ(leaf.remaining, k2M - 5);
  EXPECT_EQ(leaf.prot, uint32_t{kProtRead});
}

TEST(PageTable, FourKilobyteLeavesWhenAddressMisaligned) {
  auto table = make_table();
  ASSERT_OK(table->map(4 * k2M, 7 * k2M + k4K, k2M, kReadWrite, mem::HostAccess::direct));
  EXPECT_EQ(table->counters().leaves_4k, 512U);
  EXPECT_EQ(table->counters().leaves_2m, 0U);

  const Leaf leaf = lookup_or_fail(*table, 4 * k2M + k4K + 10);
  EXPECT_EQ(leaf.size, k4K);
  EXPECT_EQ(leaf.address, 7 * k2M + 2 * k4K + 10);
  EXPECT_EQ(leaf.remaining, k4K - 10);
}

TEST(PageTable, FourKilobyteLeavesWhenIovaMisaligned) {
  auto table = make_table();
  ASSERT_OK(table->map(4 * k2M + k4K, 8 * k2M, k2M, kReadWrite, mem::HostAccess::direct));
  EXPECT_EQ(table->counters().leaves_4k, 512U);
  EXPECT_EQ(table->counters().leaves_2m, 0U);
}

TEST(PageTable, MixesLeafSizesAlongTheRange) {
  auto table = make_table();
  // 4 KiB up to the 2 MiB boundary, one 2 MiB leaf, then a 4 KiB tail.
  const uint64_t iova = k1G - 2 * k4K;
  ASSERT_OK(table->map(iova, 4 * k1G - 2 * k4K, 2 * k4K + k2M + k4K, kReadWrite,
                       mem::HostAccess::direct));
  const PageTableCounters counters = table->counters();
  EXPECT_EQ(counters.leaves_4k, 3U);
  EXPECT_EQ(counters.leaves_2m, 1U);
  EXPECT_EQ(counters.mapped_bytes, 3 * k4K + k2M);
  EXPECT_EQ(lookup_or_fail(*table, k1G).size, k2M);
  EXPECT_EQ(lookup_or_fail(*table, k1G + k2M).size, k4K);
  EXPECT_EQ(lookup_or_fail(*table, k1G + k2M).address, 4 * k1G + k2M);
}

TEST(PageTable, RestrictedPageSizes) {
  auto small_only = make_table(k48BitLast, k4K);
  ASSERT_OK(small_only->map(k1G, k1G, k2M, kReadWrite, mem::HostAccess::direct));
  EXPECT_EQ(small_only->counters().leaves_4k, 512U);
  EXPECT_EQ(small_only->counters().leaves_2m, 0U);

  auto no_2m = make_table(k48BitLast, k4K | k1G);
  ASSERT_OK(no_2m->map(k1G, k1G, k2M, kReadWrite, mem::HostAccess::direct));
  ASSERT_OK(no_2m->map(2 * k1G, 2 * k1G, k1G, kReadWrite, mem::HostAccess::direct));
  EXPECT_EQ(no_2m->counters().leaves_4k, 512U);
  EXPECT_EQ(no_2m->counters().leaves_2m, 0U);
  EXPECT_EQ(no_2m->counters().leaves_1g, 1U);

  auto no_1g = make_table(k48BitLast, k4K | k2M);
  ASSERT_OK(no_1g->map(k1G, k1G, k1G, kReadWrite, mem::HostAccess::direct));
  EXPECT_EQ(no_1g->counters().leaves_2m, 512U);
  EXPECT_EQ(no_1g->counters().leaves_1g, 0U);
}

TEST(PageTable, LeafLevelsStopAtTheRoot) {
  // Two levels reach only 2 MiB leaves even though 1 GiB is allowed.
  auto table = make_table((uint64_t{1} << 30) - 1);
  ASSERT_EQ(table->levels(), 2U);
  ASSERT_OK(table->map(0, 0, k1G, kReadWrite, mem::HostAccess::direct));
  EXPECT_EQ(table->counters().leaves_2m, 512U);
  EXPECT_EQ(table->counters().leaves_1g, 0U);
}

TEST(PageTable, UnmapGivesAnEmptiedSlotBackToALargeLeaf) {
  auto table = make_table();
  ASSERT_OK(table->map(k2M + k4K, k4K, k4K, kReadWrite, mem::HostAccess::direct));
  EXPECT_EQ(table->unmap(k2M + k4K, k4K), k4K);
  // The 4 KiB table the slot held was emptied and unlinked, so a 2 MiB
  // aligned mapping gets one 2 MiB leaf.
  ASSERT_OK(table->map(k2M, 4 * k2M, k2M, kReadWrite, mem::HostAccess::direct));
  EXPECT_EQ(table->counters().leaves_4k, 0U);
  EXPECT_EQ(table->counters().leaves_2m, 1U);
  EXPECT_EQ(lookup_or_fail(*table, k2M + k4K).address, 4 * k2M + k4K);
}

TEST(PageTable, TableStillInUseForcesSmallerLeaves) {
  auto table = make_table();
  ASSERT_OK(table->map(k2M + k4K, k4K, k4K, kReadWrite, mem::HostAccess::direct));
  ASSERT_OK(table->map(k2M + 2 * k4K, 2 * k4K, k4K, kReadWrite, mem::HostAccess::direct));
  EXPECT_EQ(table->unmap(k2M + k4K, k4K), k4K);
  // The table still holds a leaf: it stays, and the slot cannot take a
  // large leaf; the neighbouring slot can.
  ASSERT_OK(table->map(2 * k2M, 6 * k2M, k2M, kReadWrite, mem::HostAccess::direct));
  EXPECT_EQ(table->counters().leaves_2m, 1U);
  EXPECT_EQ(table->counters().leaves_4k, 1U);
  EXPECT_EQ(lookup_or_fail(*table, k2M + 2 * k4K).address, 2 * k4K);
}

TEST(PageTable, RetiredTablesAreFreedOnlyUpToTheHorizon) {
  auto table = make_table();
  ASSERT_OK(table->map(k1G + k4K, k4K, k4K, kReadWrite, mem::HostAccess::direct));  // level 2, 1 and 0 tables
  EXPECT_EQ(table->counters().table_pages, 4U);
  table->unmap(k1G + k4K, k4K);
  const uint64_t horizon = PageTable::retire_horizon();
  ASSERT_OK(table->map(3 * k1G + k4K, k4K, k4K, kReadWrite, mem::HostAccess::direct));
  EXPECT_EQ(table->counters().table_pages, 7U);  // three retired, three new
  table->unmap(3 * k1G + k4K, k4K);
  // Only what was retired before the horizon was read is freed by it.
  table->free_retired(horizon);
  EXPECT_EQ(table->counters().table_pages, 4U);
  table->free_retired(PageTable::retire_horizon());
  EXPECT_EQ(table->counters().table_pages, 1U);
  Leaf leaf;
  EXPECT_FALSE(table->lookup(k1G + k4K, &leaf));
  EXPECT_FALSE(table->lookup(3 * k1G + k4K, &leaf));
}

TEST(PageTable, UnmapClearsExactlyTheRange) {
  auto table = make_table();
  ASSERT_OK(table->map(0x10000, 0x100000, 0x3000, kReadWrite, mem::HostAccess::direct));
  ASSERT_OK(table->map(0x13000, 0x200000, 0x2000, kProtRead, mem::HostAccess::direct));
  ASSERT_OK(table->map(0x15000, 0x300000, 0x1000, kProtWrite, mem::HostAccess::direct));

  EXPECT_EQ(table->unmap(0x13000, 0x2000), 0x2000U);
  Leaf leaf;
  EXPECT_FALSE(table->lookup(0x13000, &leaf));
  EXPECT_FALSE(table->lookup(0x14fff, &leaf));
  EXPECT_EQ(lookup_or_fail(*table, 0x12fff).address, 0x102fffU);
  EXPECT_EQ(lookup_or_fail(*table, 0x15000).address, 0x300000U);
  EXPECT_EQ(lookup_or_fail(*table, 0x15000).prot, uint32_t{kProtWrite});
  EXPECT_EQ(table->counters().mapped_bytes, 0x4000U);
  EXPECT_EQ(table->counters().leaves_4k, 4U);

  // Holes are fine and nothing is cleared twice.
  EXPECT_EQ(table->unmap(0, 0x100000), 0x4000U);
  EXPECT_EQ(table->unmap(0, 0x100000), 0U);
}

TEST(PageTable, LookupOfUnmappedIova) {
  auto table = make_table();
  Leaf leaf;
  EXPECT_FALSE(table->lookup(0, &leaf));
  EXPECT_FALSE(table->lookup(k48BitLast, &leaf));
  EXPECT_FALSE(table->lookup(UINT64_MAX, &leaf));  // beyond what 4 levels index
}

TEST(PageTable, LookupRunFollowsContiguousLeaves) {
  auto table = make_table();
  ASSERT_OK(table->map(0x10000, 0x500000, 4 * k4K, kReadWrite, mem::HostAccess::direct));
  ASSERT_OK(table->map(0x14000, 0x504000, k4K, kProtRead, mem::HostAccess::direct));  // other prot
  ASSERT_OK(
      table->map(0x15000, 0x700000, k4K, kProtRead, mem::HostAccess::direct));  // not contiguous
  ASSERT_OK(table->map(0x16000, 0x701000, k4K, kProtRead, mem::HostAccess::none));  // other kind

  Leaf leaf;
  ASSERT_TRUE(table->lookup_run(0x10010, UINT64_MAX, &leaf));
  EXPECT_EQ(leaf.address, 0x500010U);
  EXPECT_EQ(leaf.size, k4K);
  EXPECT_EQ(leaf.remaining, 4 * k4K - 0x10);
  ASSERT_TRUE(table->lookup_run(0x10010, k4K, &leaf));
  EXPECT_EQ(leaf.remaining, 2 * k4K - 0x10);  // stops once max_bytes is covered
  ASSERT_TRUE(table->lookup_run(0x10010, 0, &leaf));
  EXPECT_EQ(leaf.remaining, k4K - 0x10);
  ASSERT_TRUE(table->lookup_run(0x14000, UINT64_MAX, &leaf));
  EXPECT_EQ(leaf.remaining, k4K);
  ASSERT_TRUE(table->lookup_run(0x15000, UINT64_MAX, &leaf));
  EXPECT_EQ(leaf.remaining, k4K);
  EXPECT_FALSE(table->lookup_run(0x17000, UINT64_MAX, &leaf));

  // Runs stop at the end of a table.
  ASSERT_OK(table->map(k2M - k4K, 0x900000, 2 * k4K, kReadWrite, mem::HostAccess::direct));
  ASSERT_TRUE(table->lookup_run(k2M - k4K, UINT64_MAX, &leaf));
  EXPECT_EQ(leaf.remaining, k4K);
}

TEST(PageTable, SyntheticAndProtBitsRoundTrip) {
  auto table = make_table();
  const uint64_t synthetic_address = 0x7f0000000000;
  ASSERT_OK(table->map(k2M, synthetic_address, k2M, kProtRead, mem::HostAccess::none));
  const Leaf leaf = lookup_or_fail(*table, k2M + 7);
  EXPECT_EQ(leaf.host_access, mem::HostAccess::none);
  EXPECT_EQ(leaf.address, synthetic_address + 7);
  EXPECT_EQ(leaf.prot, uint32_t{kProtRead});
  EXPECT_EQ(leaf.size, k2M);
}

TEST(PageTable, FullSixtyFourBitAperture) {
  auto table = make_table(UINT64_MAX);
  ASSERT_EQ(table->levels(), 6U);
  const uint64_t top_page = 0xFFFFFFFFFFFFF000;
  ASSERT_OK(table->map(top_page, 0x5000, k4K, kReadWrite, mem::HostAccess::direct));
  const Leaf leaf = lookup_or_fail(*table, UINT64_MAX);
  EXPECT_EQ(leaf.address, 0x5FFFU);
  EXPECT_EQ(leaf.remaining, 1U);
  Leaf missing;
  EXPECT_FALSE(table->lookup(top_page - 1, &missing));
  EXPECT_EQ(table->unmap(top_page, k4K), k4K);
  EXPECT_FALSE(table->lookup(top_page, &missing));

  // A 1 GiB leaf next to the top gigabyte (whose slot now holds a table),
  // and an unmap reaching the very end of the space.
  const uint64_t second_to_last_gigabyte = UINT64_MAX - 2 * k1G + 1;
  ASSERT_OK(table->map(second_to_last_gigabyte, k1G, k1G, kReadWrite, mem::HostAccess::direct));
  EXPECT_EQ(table->counters().leaves_1g, 1U);
  EXPECT_EQ(table->unmap(second_to_last_gigabyte, 2 * k1G), k1G);
  EXPECT_EQ(table->counters().mapped_bytes, 0U);
}

TEST(PageTable, MapRejectsBadArguments) {
  auto table = make_table();
  EXPECT_ERRNO(table->map(0x1001, 0, k4K, kReadWrite, mem::HostAccess::direct), EINVAL);
  EXPECT_ERRNO(table->map(0, 0x1001, k4K, kReadWrite, mem::HostAccess::direct), EINVAL);
  EXPECT_ERRNO(table->map(0, 0, 0x1001, kReadWrite, mem::HostAccess::direct), EINVAL);
  EXPECT_ERRNO(table->map(0, 0, 0, kReadWrite, mem::HostAccess::direct), EINVAL);
  EXPECT_ERRNO(table->map(uint64_t{1} << 48, 0, k4K, kReadWrite, mem::HostAccess::direct), EINVAL);
  EXPECT_ERRNO(table->map(0, 0xFFFFFFFFFFFFF000, 2 * k4K, kReadWrite, mem::HostAccess::direct),
               EINVAL);
  EXPECT_ERRNO(table->map(0, 0, k4K, 1U << 5, mem::HostAccess::direct), EINVAL);
  EXPECT_EQ(table->counters().mapped_bytes, 0U);
}

TEST(PageTable, MapOverALeafFailsAndUndoesItsWork) {
  auto table = make_table();
  ASSERT_OK(table->map(2 * k4K, 0x900000, k4K, kProtRead, mem::HostAccess::direct));
  EXPECT_ERRNO(table->map(0, 0x100000, 4 * k4K, kReadWrite, mem::HostAccess::direct), EEXIST);
  Leaf leaf;
  EXPECT_FALSE(table->lookup(0, &leaf));
  EXPECT_FALSE(table->lookup(k4K, &leaf));
  EXPECT_FALSE(table->lookup(3 * k4K, &leaf));
  EXPECT_EQ(lookup_or_fail(*table, 2 * k4K).address, 0x900000U);
  EXPECT_EQ(table->counters().mapped_bytes, k4K);
  EXPECT_EQ(table->counters().leaves_4k, 1U);

  // A large leaf in the way of a smaller mapping is caught too.
  ASSERT_OK(table->map(k1G, k1G, k1G, kReadWrite, mem::HostAccess::direct));
  EXPECT_ERRNO(table->map(k1G + k4K, 0, k4K, kReadWrite, mem::HostAccess::direct), EEXIST);
}

TEST(PageTable, CountersReturnToZero) {
  auto table = make_table();
  EXPECT_EQ(table->counters().table_pages, 1U);
  ASSERT_OK(
      table->map(k1G - k4K, k1G - k4K, k1G + k2M + 2 * k4K, kReadWrite, mem::HostAccess::direct));
  const PageTableCounters mapped = table->counters();
  EXPECT_EQ(mapped.mapped_bytes, k1G + k2M + 2 * k4K);
  EXPECT_EQ(mapped.leaves_1g, 1U);
  EXPECT_EQ(mapped.leaves_2m, 1U);
  EXPECT_EQ(mapped.leaves_4k, 2U);
  // Root, one level-2 table, level-1 tables around 1 GiB and 2 GiB, and
  // level-0 tables for the two 4 KiB leaves.
  EXPECT_EQ(mapped.table_pages, 6U);

  EXPECT_EQ(table->unmap(k1G - k4K, k1G + k2M + 2 * k4K), k1G + k2M + 2 * k4K);
  const PageTableCounters unmapped = table->counters();
  EXPECT_EQ(unmapped.mapped_bytes, 0U);
  EXPECT_EQ(unmapped.leaves_4k, 0U);
  EXPECT_EQ(unmapped.leaves_2m, 0U);
  EXPECT_EQ(unmapped.leaves_1g, 0U);
  // Emptied tables are retired, and freed once readers were waited for.
  EXPECT_EQ(unmapped.table_pages, mapped.table_pages);
  table->free_retired(PageTable::retire_horizon());
  EXPECT_EQ(table->counters().table_pages, 1U);
}

}  // namespace
}  // namespace iomm::domain
