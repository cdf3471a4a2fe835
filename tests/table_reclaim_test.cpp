// Page-table pages and dirty-log tables follow what is mapped: an unmap frees
// the tables it empties (after its grace period), so churning mappings over
// ever new IOVAs does not grow a long-lived domain or IOAS, and an emptied
// slot takes a large leaf again.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "ioas/ioas_state.hpp"
#include "iomm/access.hpp"
#include "iomm/rcu.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

constexpr uint32_t kRW = kProtRead | kProtWrite;
constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kGiB = uint64_t{1} << 30;

TEST(TableReclaim, ChurnOverDistinctRangesReturnsToTheBaseline) {
  auto ioas = Ioas::create({}).value();
  auto domain = SoftDomain::create({}).value();
  ASSERT_OK(ioas->attach(domain));
  const uint64_t baseline = domain->counters().table_pages;
  EXPECT_EQ(baseline, 1U);
  for (uint64_t i = 0; i < 200; ++i) {
    // 4 KiB-aligned IOVA in a new GiB each time: new level-2, level-1 and
    // level-0 tables for every mapping.
    const uint64_t iova = (i + 1) * 7 * kGiB + 0x1000;
    ASSERT_OK(ioas->map(*MemorySource::simulated(8 * kPageSize), kRW, iova));
    EXPECT_EQ(domain->counters().table_pages, baseline + 3);
    ASSERT_OK(ioas->unmap(iova, 8 * kPageSize));
    ASSERT_EQ(domain->counters().table_pages, baseline) << "after mapping " << i;
  }
  // A mapping that stays keeps its own tables, and only those.
  ASSERT_OK(ioas->map(*MemorySource::simulated(kPageSize), kRW, 0x1000));
  const uint64_t with_one = domain->counters().table_pages;
  ASSERT_OK(ioas->map(*MemorySource::simulated(kPageSize), kRW, 5 * kGiB + 0x1000));
  ASSERT_OK(ioas->unmap(5 * kGiB + 0x1000, kPageSize));
  EXPECT_EQ(domain->counters().table_pages, with_one);
  ASSERT_OK(ioas->unmap_all());
  EXPECT_EQ(domain->counters().table_pages, baseline);
  ASSERT_OK(ioas->detach(domain));
}

TEST(TableReclaim, TwoMegabyteLeafAgainAfterAFourKilobyteMappingIsUnmapped) {
  test::Memfd mfd(4 * kMiB);
  auto ioas = Ioas::create({}).value();
  auto domain = SoftDomain::create({}).value();
  ASSERT_OK(ioas->attach(domain));
  // The file's host window is 1 GiB aligned: offset 0x1000 is only 4 KiB
  // aligned, offset 2 MiB is 2 MiB aligned.
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0x1000, kPageSize), kRW, 0x40001000));
  EXPECT_EQ(domain->counters().leaves_4k, 1U);
  ASSERT_OK(ioas->unmap(0x40001000, kPageSize));
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 2 * kMiB, 2 * kMiB), kRW, 0x40000000));
  EXPECT_EQ(domain->counters().leaves_2m, 1U);
  EXPECT_EQ(domain->counters().leaves_4k, 0U);
  ASSERT_OK(ioas->unmap_all());
  ASSERT_OK(ioas->detach(domain));
}

TEST(TableReclaim, DirtyLogTablesFollowTheMappings) {
  test::Memfd mfd(2 * kMiB);
  auto ioas = Ioas::create({}).value();
  ioas->set_dirty_tracking(true);
  auto access = Access::create(ioas, [](const IovaRange&) {}).value();
  const dirty::DirtyLog& log = ioas::state_of(*ioas).dirty;
  EXPECT_EQ(log.tables(), 0U);
  const char byte = 'd';
  for (uint64_t i = 0; i < 100; ++i) {
    // A new 64 GiB stretch each time: new inner nodes and a new leaf block.
    const uint64_t iova = (i + 1) * 64 * kGiB;
    ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, 2 * kMiB), kRW, iova));
    ASSERT_OK(access->write(iova + kMiB, &byte, 1));
    EXPECT_GT(log.tables(), 0U);
    ASSERT_OK(ioas->unmap(iova, 2 * kMiB));
    ASSERT_EQ(log.tables(), 0U) << "after mapping " << i;
  }
  // Tables a remaining mapping can still mark stay, with its bits.
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, kMiB), kRW, 0x100000));
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), kMiB, kMiB), kRW, 0x200000));
  ASSERT_OK(access->write(0x100000, &byte, 1));
  const size_t tables = log.tables();
  ASSERT_OK(ioas->unmap(0x200000, kMiB));
  EXPECT_EQ(log.tables(), tables);
  std::vector<uint64_t> bitmap(1);
  ASSERT_OK(ioas->read_and_clear_dirty(0x100000, 64 * kPageSize, bitmap));
  EXPECT_EQ(bitmap[0], 1U);
  access.reset();
  ASSERT_OK(ioas->unmap_all());
  EXPECT_EQ(log.tables(), 0U);
}

// Lock-free translations race unmaps that free tables: every translation
// either fails or gives the address that was mapped (under TSan and ASan a
// table freed too early is a reported race or use after free).
TEST(TableReclaim, TranslateRacingUnmapsNeverSeesAFreedTable) {
  auto ioas = Ioas::create({}).value();
  auto domain = SoftDomain::create({}).value();
  ASSERT_OK(ioas->attach(domain));
  auto src = MemorySource::simulated(kPageSize);
  ASSERT_OK(src);
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> seen{0};
  std::thread reader([&] {
    while (!stop.load()) {
      for (uint64_t i = 0; i < 4; ++i) {
        auto t = domain->translate((i + 1) * kGiB + 0x1000, kProtRead);
        if (t.ok()) {
          EXPECT_EQ(t->address, src->object()->dma_address(0));
          seen.fetch_add(1);
        } else {
          EXPECT_EQ(t.code(), EFAULT);
        }
      }
    }
  });
  for (int round = 0; round < 300; ++round) {
    const uint64_t iova = (round % 4 + 1) * kGiB + 0x1000;
    ASSERT_OK(ioas->map(*src, kRW, iova));
    ASSERT_OK(ioas->unmap(iova, kPageSize));
  }
  stop = true;
  reader.join();
  domain->take_faults();
  EXPECT_EQ(domain->counters().table_pages, 1U);
  ASSERT_OK(ioas->detach(domain));
}

}  // namespace
}  // namespace iomm
