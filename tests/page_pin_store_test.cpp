// Per-page pins counted per page: mem::PageCounts itself, and the pin
// store's page counts (MemObject::pin_pages) reached through
// Access::pin_pages: a count per page, pinned and charged on 0 -> 1,
// released on 1 -> 0, whatever runs the pages were pinned in and however
// they mix with segment pins (a domain's map, an access's range pin).
// That unpin never allocates is checked in allocation_failure_test.cpp.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <utility>
#include <vector>

#include "iomm/access.hpp"
#include "iomm/accounting.hpp"
#include "iomm/domain.hpp"
#include "mem/page_counts.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

constexpr uint32_t kRW = kProtRead | kProtWrite;
constexpr uint64_t kMiB = 1 << 20;

TEST(PageCounts, BitsThenCountsAboveOneThenBitsAgain) {
  mem::PageCounts pc;
  EXPECT_TRUE(pc.empty());
  pc.prepare(10, 20);
  for (uint64_t i = 10; i <= 20; ++i) EXPECT_EQ(pc.add(i), 0U);
  EXPECT_EQ(pc.get(9), 0U);
  EXPECT_EQ(pc.get(15), 1U);
  pc.prepare(15, 15);  // 15 goes to 2: a count array
  EXPECT_EQ(pc.add(15), 1U);
  pc.prepare(15, 15, 3);
  EXPECT_EQ(pc.add(15, 3), 2U);
  EXPECT_EQ(pc.get(15), 5U);
  EXPECT_EQ(pc.sub(15, 4), 1U);
  EXPECT_EQ(pc.get(15), 1U);
  EXPECT_EQ(pc.get(14), 1U);
  std::vector<uint64_t> seen;
  pc.for_each_nonzero(0, 100, [&](uint64_t i) { seen.push_back(i); });
  EXPECT_EQ(seen.size(), 11U);
  EXPECT_EQ(seen.front(), 10U);
  EXPECT_EQ(seen.back(), 20U);
  EXPECT_EQ(pc.next(0, 100, false), 10U);
  EXPECT_EQ(pc.next(10, 100, true), 21U);
  EXPECT_TRUE(pc.any_nonzero(20, 30));
  EXPECT_FALSE(pc.any_nonzero(21, 30));
  for (uint64_t i = 10; i <= 20; ++i) EXPECT_EQ(pc.sub(i), 0U);
  EXPECT_TRUE(pc.empty());  // the last count freed the block
}

TEST(PageCounts, HeldBlocksOutliveTheirLastCount) {
  mem::PageCounts pc;
  pc.prepare(511, 512);  // two blocks
  pc.hold_blocks(511, 512);
  pc.add(511);
  EXPECT_EQ(pc.sub(511), 0U);
  EXPECT_FALSE(pc.empty());  // held: a caller still works on it
  pc.add(512);
  pc.release_blocks(511, 512);
  EXPECT_EQ(pc.get(512), 1U);
  EXPECT_EQ(pc.next(0, 1000, false), 512U);
  EXPECT_EQ(pc.sub(512), 0U);
  EXPECT_TRUE(pc.empty());
  pc.prepare(7, 7);
  pc.trim(0, 100);  // prepared but never raised
  EXPECT_TRUE(pc.empty());
}

// Whole runs at once: across blocks, through count arrays and bitmaps
// alike, with full 64-bit words and ragged ends; runs that fell to zero
// come back merged across words and blocks.
TEST(PageCounts, RangesAcrossBlocksAndWords) {
  mem::PageCounts pc;
  pc.prepare(100, 1100);
  EXPECT_EQ(pc.add_range(100, 1100), 1001U);
  EXPECT_EQ(pc.count_nonzero(0, 5000), 1001U);
  EXPECT_EQ(pc.count_nonzero(128, 191), 64U);  // one whole word
  EXPECT_EQ(pc.next(0, 5000, false), 100U);
  EXPECT_EQ(pc.next(100, 5000, true), 1101U);
  pc.prepare(300, 700);  // already counted: count arrays in blocks 0 and 1
  EXPECT_EQ(pc.add_range(300, 700), 0U);
  EXPECT_EQ(pc.get(299), 1U);
  EXPECT_EQ(pc.get(300), 2U);
  EXPECT_EQ(pc.get(700), 2U);
  EXPECT_EQ(pc.get(701), 1U);
  EXPECT_EQ(pc.next_count(0, 5000, 2, true), 300U);
  EXPECT_EQ(pc.next_count(300, 5000, 2, false), 701U);
  EXPECT_EQ(pc.next_count(0, 5000, 1, true), 100U);
  EXPECT_EQ(pc.next_count(1000, 5000, 1, false), 1101U);
  std::vector<std::pair<uint64_t, uint64_t>> zeroed;
  auto record = [&](uint64_t lo, uint64_t hi) { zeroed.emplace_back(lo, hi); };
  EXPECT_EQ(pc.sub_range(100, 1100, 1, record), 600U);
  ASSERT_EQ(zeroed.size(), 2U);
  EXPECT_EQ(zeroed[0], std::make_pair(uint64_t{100}, uint64_t{299}));
  EXPECT_EQ(zeroed[1], std::make_pair(uint64_t{701}, uint64_t{1100}));
  EXPECT_EQ(pc.get(300), 1U);
  EXPECT_EQ(pc.count_nonzero(0, 5000), 401U);
  zeroed.clear();
  EXPECT_EQ(pc.sub_range(300, 700, 1, record), 401U);
  ASSERT_EQ(zeroed.size(), 1U);
  EXPECT_EQ(zeroed[0], std::make_pair(uint64_t{300}, uint64_t{700}));
  EXPECT_TRUE(pc.empty());  // every block freed with its last count

  // Exactly one whole word, and a granule's worth of pages at once.
  pc.prepare(64, 127);
  EXPECT_EQ(pc.add_range(64, 127), 64U);
  zeroed.clear();
  EXPECT_EQ(pc.sub_range(64, 127, 1, record), 64U);
  ASSERT_EQ(zeroed.size(), 1U);
  EXPECT_EQ(zeroed[0], std::make_pair(uint64_t{64}, uint64_t{127}));
  pc.prepare(5, 6, 512);
  EXPECT_EQ(pc.add_range(5, 6, 512), 2U);
  EXPECT_EQ(pc.get(6), 512U);
  EXPECT_EQ(pc.sub_range(5, 6, 511), 0U);
  EXPECT_EQ(pc.sub_range(5, 6, 1), 2U);
  EXPECT_TRUE(pc.empty());
}

class PagePinStore : public testing::Test {
 protected:
  void SetUp() override {
    ASSERT_OK(set_memlock_limit(AccountMode::per_process, 0, 16 * kMiB));
    ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, 4 * kMiB), kRW, kBase));
  }
  void TearDown() override {
    access.reset();
    EXPECT_OK(ioas->unmap_all());
    EXPECT_EQ(counters().pinned_bytes, 0U);
    EXPECT_EQ(counters().charged_bytes, 0U);
  }
  static constexpr uint64_t kBase = 0x400000;
  static uint64_t pinned() { return counters().pinned_bytes; }
  static uint64_t charged() { return counters().charged_bytes; }

  test::WithoutIpcLock nocap;  // charging on
  test::Memfd mfd{4 * kMiB};
  std::shared_ptr<Ioas> ioas = Ioas::create({}).value();
  std::shared_ptr<Access> access = Access::create(ioas, [](const IovaRange&) {}).value();
  std::vector<void*> host = std::vector<void*>(512);
};

// One call of 512 fresh pages, then pages dropped one by one in a
// fragmenting pattern: each release is exact, the rest stays pinned.
TEST_F(PagePinStore, RunPinnedAtOnceIsReleasedPageByPage) {
  ASSERT_OK(access->pin_pages(kBase, 512, kRW, host.data()));
  EXPECT_EQ(pinned(), 2 * kMiB);
  EXPECT_EQ(charged(), 2 * kMiB);
  EXPECT_EQ(host[7], static_cast<char*>(host[0]) + 7 * kPageSize);
  for (uint64_t i = 1; i < 512; i += 2) ASSERT_OK(access->unpin_pages(kBase + i * kPageSize, 1));
  EXPECT_EQ(pinned(), kMiB);
  EXPECT_EQ(charged(), kMiB);
  EXPECT_EQ(access->page_pinned_count(), 256U);
  // A page no longer pinned makes a longer unpin fail whole.
  EXPECT_ERRNO(access->unpin_pages(kBase, 2), EINVAL);
  EXPECT_EQ(access->page_pinned_count(), 256U);
  EXPECT_EQ(pinned(), kMiB);
  for (uint64_t i = 0; i < 512; i += 2) ASSERT_OK(access->unpin_pages(kBase + i * kPageSize, 1));
  EXPECT_EQ(pinned(), 0U);
  EXPECT_EQ(charged(), 0U);
  EXPECT_EQ(process_vmlck_bytes(), 0U);
}

// Only the transition to zero releases; a page pinned by several calls
// (and runs overlapping in every way) is pinned and charged once.
TEST_F(PagePinStore, RefcountTransitions) {
  ASSERT_OK(access->pin_pages(kBase, 4, kRW, host.data()));
  ASSERT_OK(access->pin_pages(kBase + 2 * kPageSize, 4, kRW, host.data()));  // pages 2..5
  ASSERT_OK(access->pin_pages(kBase + 3 * kPageSize, 1, kProtRead, host.data()));
  EXPECT_EQ(access->page_pinned_count(), 6U);
  EXPECT_EQ(pinned(), 6 * kPageSize);
  EXPECT_EQ(charged(), 6 * kPageSize);
  ASSERT_OK(access->unpin_pages(kBase + 2 * kPageSize, 4));  // 2, 3 stay; 4, 5 go
  EXPECT_EQ(access->page_pinned_count(), 4U);
  EXPECT_EQ(pinned(), 4 * kPageSize);
  ASSERT_OK(access->unpin_pages(kBase + 3 * kPageSize, 1));  // 3 still held once
  EXPECT_EQ(pinned(), 4 * kPageSize);
  ASSERT_OK(access->unpin_pages(kBase, 4));
  EXPECT_EQ(access->page_pinned_count(), 0U);
  EXPECT_EQ(pinned(), 0U);
  EXPECT_EQ(charged(), 0U);
  EXPECT_ERRNO(access->unpin_pages(kBase, 1), EINVAL);
}

// Every 64th page, each pinned alone, across two 512-page blocks and into
// a second access of the same memory: pinned once, charged once.
TEST_F(PagePinStore, FragmentedPagesAndTwoAccesses) {
  auto other = Access::create(ioas, [](const IovaRange&) {}).value();
  for (uint64_t i = 0; i < 1024; i += 64) {
    ASSERT_OK(access->pin_pages(kBase + i * kPageSize, 1, kRW, host.data()));
    ASSERT_OK(other->pin_pages(kBase + i * kPageSize, 2, kRW, host.data()));
  }
  EXPECT_EQ(pinned(), 32 * kPageSize);
  EXPECT_EQ(charged(), 32 * kPageSize);
  for (uint64_t i = 0; i < 1024; i += 64) {
    ASSERT_OK(access->unpin_pages(kBase + i * kPageSize, 1));
  }
  EXPECT_EQ(pinned(), 32 * kPageSize);  // the other access still holds them all
  other.reset();                        // releases its pins
  EXPECT_EQ(pinned(), 0U);
  EXPECT_EQ(charged(), 0U);
}

// Page counts and segment counts of one object: a range pin over page pins
// and page pins over a domain's mapping lock and charge each page once, and
// each side's release leaves what the other holds.
TEST_F(PagePinStore, MixedWithSegmentPins) {
  ASSERT_OK(access->pin_pages(kBase + kPageSize, 2, kRW, host.data()));
  auto range = access->pin(kBase, 8 * kPageSize, kRW);
  ASSERT_OK(range);
  EXPECT_EQ(pinned(), 8 * kPageSize);
  EXPECT_EQ(charged(), 8 * kPageSize);
  ASSERT_OK(access->unpin(kBase, 8 * kPageSize));
  EXPECT_EQ(pinned(), 2 * kPageSize);
  EXPECT_EQ(charged(), 2 * kPageSize);
  ASSERT_OK(access->pin_pages(kBase + 3 * kPageSize, 1, kRW, host.data()));
  EXPECT_EQ(pinned(), 3 * kPageSize);

  auto domain = SoftDomain::create({}).value();
  ASSERT_OK(ioas->attach(domain));  // pins the whole mapping
  EXPECT_EQ(pinned(), 4 * kMiB);
  EXPECT_EQ(charged(), 4 * kMiB);
  ASSERT_OK(access->pin_pages(kBase + 100 * kPageSize, 3, kRW, host.data()));
  EXPECT_EQ(pinned(), 4 * kMiB);
  EXPECT_EQ(charged(), 4 * kMiB);
  ASSERT_OK(access->unpin_pages(kBase + kPageSize, 1));
  EXPECT_EQ(pinned(), 4 * kMiB);
  ASSERT_OK(ioas->detach(domain));  // the page pins stay, pinned and charged
  EXPECT_EQ(pinned(), 5 * kPageSize);
  EXPECT_EQ(charged(), 5 * kPageSize);
  ASSERT_OK(access->unpin_pages(kBase + 100 * kPageSize, 3));
  ASSERT_OK(access->unpin_pages(kBase + 2 * kPageSize, 2));
  EXPECT_EQ(pinned(), 0U);
  EXPECT_EQ(charged(), 0U);
}

// A run that crosses into a mapping of other memory is pinned as one run
// per mapping; a failure in the second (here: an unmapped page after it)
// is found before anything is pinned.
TEST_F(PagePinStore, RunsSplitAtMappings) {
  std::vector<char> user(kMiB + kPageSize);
  const uint64_t base =
      (reinterpret_cast<uint64_t>(user.data()) + kPageSize - 1) & ~(kPageSize - 1);
  ASSERT_OK(ioas->map(*MemorySource::from_user(reinterpret_cast<void*>(base), 16 * kPageSize), kRW,
                      kBase + 4 * kMiB));
  EXPECT_ERRNO(access->pin_pages(kBase + 4 * kMiB - 2 * kPageSize, 20, kRW, host.data()), ENOENT);
  EXPECT_EQ(pinned(), 0U);
  ASSERT_OK(access->pin_pages(kBase + 4 * kMiB - 2 * kPageSize, 4, kRW, host.data()));
  EXPECT_EQ(pinned(), 4 * kPageSize);
  EXPECT_EQ(host[2], reinterpret_cast<void*>(base));
  ASSERT_OK(access->unpin_pages(kBase + 4 * kMiB - kPageSize, 2));
  EXPECT_EQ(pinned(), 2 * kPageSize);
  ASSERT_OK(access->unpin_pages(kBase + 4 * kMiB - 2 * kPageSize, 1));
  ASSERT_OK(access->unpin_pages(kBase + 4 * kMiB + kPageSize, 1));
  EXPECT_EQ(pinned(), 0U);
}

// A fresh page pin of a 4 KiB file relies on mlock to report a page it
// cannot fault in once an earlier pin has shown that mlock populates the
// file's mapping (no mincore then): past the end of a file that shrank
// after that first pin, the pin is still EFAULT and leaves nothing pinned,
// charged or locked, and the pages still inside the file pin as before.
TEST(PagePinStoreShrunk, FreshPinPastTheEndAfterAWorkingPinIsEfault) {
  const test::WithoutIpcLock nocap;
  ASSERT_OK(set_memlock_limit(AccountMode::per_process, 0, 16 * kMiB));
  test::Memfd mfd(2 * kMiB, 0, test::Shrink::allowed);
  auto ioas = Ioas::create({}).value();
  constexpr uint64_t kBase = 0x400000;
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, 2 * kMiB, FileSeal::allow_shrink), kRW,
                      kBase));
  {
    auto access = Access::create(ioas, [](const IovaRange&) {}).value();
    std::vector<void*> host(512);
    ASSERT_OK(access->pin_pages(kBase, 512, kRW, host.data()));
    ASSERT_OK(access->unpin_pages(kBase, 512));
    ASSERT_EQ(ftruncate(mfd.fd(), kMiB), 0);
    // Pages 200..299: the file now ends at page 256.
    EXPECT_ERRNO(access->pin_pages(kBase + 200 * kPageSize, 100, kRW, host.data()), EFAULT);
    EXPECT_EQ(access->page_pinned_count(), 0U);
    EXPECT_EQ(counters().pinned_bytes, 0U);
    EXPECT_EQ(counters().charged_bytes, 0U);
    EXPECT_EQ(process_vmlck_bytes(), 0U);
    ASSERT_OK(access->pin_pages(kBase, 256, kRW, host.data()));
    EXPECT_EQ(counters().pinned_bytes, kMiB);
    EXPECT_EQ(process_vmlck_bytes(), kMiB);
    ASSERT_OK(access->unpin_pages(kBase, 256));
    EXPECT_EQ(counters().pinned_bytes, 0U);
    EXPECT_EQ(counters().charged_bytes, 0U);
    EXPECT_EQ(process_vmlck_bytes(), 0U);
  }
  EXPECT_OK(ioas->unmap_all());
}

// Page pins of 2 MiB hugetlb memory: the pin store counts 4 KiB pages per
// huge granule, so a run that starts and ends inside huge pages raises
// their counts by the part it covers; each huge page is locked and charged
// while any of its pages is pinned, whatever the grouping of the unpins.
TEST(PagePinStoreHugetlb, PartialGranulesAtBothEnds) {
  constexpr uint64_t kHuge = 2 * kMiB;
  IOMM_NEEDS(test::hugetlb_available(2 * kHuge), "2 MiB huge pages (vm.nr_hugepages)");
  const test::WithoutIpcLock nocap;
  ASSERT_OK(set_memlock_limit(AccountMode::per_process, 0, 16 * kMiB));
  test::Memfd mfd(2 * kHuge, MFD_HUGETLB);
  auto ioas = Ioas::create({}).value();
  constexpr uint64_t kBase = 0x40000000;
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, 2 * kHuge), kRW, kBase));
  {
    auto access = Access::create(ioas, [](const IovaRange&) {}).value();
    std::vector<void*> host(8);
    // Pages 510..513: two in each huge page.
    ASSERT_OK(access->pin_pages(kBase + 510 * kPageSize, 4, kRW, host.data()));
    EXPECT_EQ(counters().pinned_bytes, 2 * kHuge);
    EXPECT_EQ(counters().charged_bytes, 2 * kHuge);
    EXPECT_EQ(host[3], static_cast<char*>(host[0]) + 3 * kPageSize);
    ASSERT_OK(access->pin_pages(kBase + 513 * kPageSize, 2, kRW, host.data()));  // 513 twice
    ASSERT_OK(access->unpin_pages(kBase + 510 * kPageSize, 2));  // the first huge page goes
    EXPECT_EQ(counters().pinned_bytes, kHuge);
    EXPECT_EQ(counters().charged_bytes, kHuge);
    ASSERT_OK(access->unpin_pages(kBase + 512 * kPageSize, 3));  // 513 still held once
    EXPECT_EQ(counters().pinned_bytes, kHuge);
    ASSERT_OK(access->unpin_pages(kBase + 513 * kPageSize, 1));
    EXPECT_EQ(counters().pinned_bytes, 0U);
    EXPECT_EQ(counters().charged_bytes, 0U);
    EXPECT_EQ(process_vmlck_bytes(), 0U);
  }
  EXPECT_OK(ioas->unmap_all());
}

}  // namespace
}  // namespace iomm
