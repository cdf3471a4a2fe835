// Unmap notification waits for pins that are still locking pages instead of
// giving up after a fixed time, and a pin stuck in a page fault blocks
// neither the notification of other ranges nor dirty reads.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>
#include <vector>

#include "iomm/access.hpp"
#include "test_support.hpp"
#include "userfault_region.hpp"

namespace iomm {
namespace {

using namespace std::chrono_literals;

constexpr uint32_t kRW = kProtRead | kProtWrite;
constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kStuckIova = 0x40000000;
constexpr uint64_t kStuckPages = 16;

// Runs f on a thread; done() tells whether it has returned.
class Background {
 public:
  template <typename F>
  explicit Background(F f)
      : thread_([this, f] {
          f();
          done_ = true;
        }) {}
  ~Background() {
    if (thread_.joinable()) thread_.join();
  }
  [[nodiscard]] bool done() const { return done_.load(); }
  // Whether f returns within limit.
  bool finishes_within(std::chrono::milliseconds limit) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (!done_.load() && std::chrono::steady_clock::now() < end)
      std::this_thread::sleep_for(1ms);
    return done_.load();
  }
  void join() { thread_.join(); }

 private:
  std::atomic<bool> done_{false};
  std::thread thread_;
};

// A well-behaved driver that records a pin once pin() has returned (under
// its lock, which its callback also takes) and drops every recorded pin
// overlapping an unmapped range.
struct RecordAfterPinDriver {
  std::mutex mu;
  std::vector<std::pair<uint64_t, uint64_t>> pins;
  std::shared_ptr<Access> access;
  int calls = 0;

  void on_unmap(const IovaRange& r) {
    std::lock_guard lk(mu);
    ++calls;
    std::erase_if(pins, [&](const auto& p) {
      if (!IovaRange{p.first, p.first + p.second - 1}.overlaps(r)) return false;
      EXPECT_OK(access->unpin(p.first, p.second));
      return true;
    });
  }
  Status pin(uint64_t iova, uint64_t length) {
    auto r = access->pin(iova, length, kRW);
    if (!r.ok()) return r.error();
    std::lock_guard lk(mu);
    pins.emplace_back(iova, length);
    return {};
  }
};

TEST(UnmapProgress, PinStillLockingPagesIsWaitedForNotEdeadlock) {
  test::UserfaultRegion slow(kStuckPages * kPageSize);
  IOMM_NEEDS(slow.ok(),
             "userfaultfd for kernel-mode faults (vm.unprivileged_userfaultfd=1 when not root)");
  auto ioas = Ioas::create({}).value();
  RecordAfterPinDriver drv;
  drv.access = Access::create(ioas, [&drv](const IovaRange& r) { drv.on_unmap(r); }).value();
  ASSERT_OK(
      ioas->map(*MemorySource::from_user(slow.addr(), kStuckPages * kPageSize), kRW, kStuckIova));

  Status pinned = Error(EINPROGRESS, "");
  Background pinner([&] { pinned = drv.pin(kStuckIova, kStuckPages * kPageSize); });
  ASSERT_TRUE(slow.wait_fault(10000)) << "the pin never faulted";
  Result<uint64_t> unmapped = Error(EINPROGRESS, "");
  Background unmapper([&] { unmapped = ioas->unmap(kStuckIova, kStuckPages * kPageSize); });
  // Far longer than the ~85 ms of back-off after which the unmap used to
  // give up on a pin that was merely slow.
  std::this_thread::sleep_for(400ms);
  EXPECT_FALSE(unmapper.done()) << "the unmap did not wait for the pin in flight";
  slow.resolve_all();
  pinner.join();
  unmapper.join();
  ASSERT_OK(pinned);
  ASSERT_OK(unmapped);
  EXPECT_EQ(*unmapped, kStuckPages * kPageSize);
  EXPECT_EQ(drv.access->pin_count(), 0U);
  EXPECT_EQ(ioas->counters().mappings, 0U);
  EXPECT_EQ(counters().pinned_bytes, 0U);
}

TEST(UnmapProgress, PinThatNeverLeavesFlightEndsInEdeadlockWithinTheWait) {
  test::UserfaultRegion stuck(kStuckPages * kPageSize);
  IOMM_NEEDS(stuck.ok(),
             "userfaultfd for kernel-mode faults (vm.unprivileged_userfaultfd=1 when not root)");
  IoasOptions options;
  options.unmap_pin_wait_ms = 300;
  auto ioas = Ioas::create(options).value();
  RecordAfterPinDriver drv;
  drv.access = Access::create(ioas, [&drv](const IovaRange& r) { drv.on_unmap(r); }).value();
  ASSERT_OK(
      ioas->map(*MemorySource::from_user(stuck.addr(), kStuckPages * kPageSize), kRW, kStuckIova));
  Status pinned = Error(EINPROGRESS, "");
  Background pinner([&] { pinned = drv.pin(kStuckIova, kStuckPages * kPageSize); });
  ASSERT_TRUE(stuck.wait_fault(10000)) << "the pin never faulted";

  const auto start = std::chrono::steady_clock::now();
  EXPECT_ERRNO(ioas->unmap(kStuckIova, kStuckPages * kPageSize), EDEADLOCK);
  const auto waited = std::chrono::steady_clock::now() - start;
  EXPECT_GE(waited, 300ms);
  EXPECT_LT(waited, 5s);
  EXPECT_EQ(ioas->counters().mappings, 1U);  // nothing unmapped

  stuck.resolve_all();
  pinner.join();
  ASSERT_OK(pinned);  // the mapping is live again, so the pin completes
  ASSERT_OK(ioas->unmap(kStuckIova, kStuckPages * kPageSize));
  EXPECT_EQ(drv.access->pin_count(), 0U);
  EXPECT_EQ(counters().pinned_bytes, 0U);
}

// Only accesses whose pins, held or in flight, overlap the range are called:
// an access whose only pin is stuck locking pages elsewhere is left alone
// (the fuzzer's report in fuzz/README.md; it used to be called, as any pin in
// flight counted wherever it was headed).
TEST(UnmapProgress, PinInFlightElsewhereIsNotCalledBack) {
  test::UserfaultRegion stuck(kStuckPages * kPageSize);
  IOMM_NEEDS(stuck.ok(),
             "userfaultfd for kernel-mode faults (vm.unprivileged_userfaultfd=1 when not root)");
  test::Memfd mfd(kMiB);
  auto ioas = Ioas::create({}).value();
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, kMiB), kRW, 0x100000));
  ASSERT_OK(
      ioas->map(*MemorySource::from_user(stuck.addr(), kStuckPages * kPageSize), kRW, kStuckIova));
  RecordAfterPinDriver holder;
  holder.access = Access::create(ioas, [&](const IovaRange& r) { holder.on_unmap(r); }).value();
  RecordAfterPinDriver elsewhere;
  elsewhere.access =
      Access::create(ioas, [&](const IovaRange& r) { elsewhere.on_unmap(r); }).value();
  ASSERT_OK(holder.pin(0x100000, kPageSize));

  Status stuck_pin = Error(EINPROGRESS, "");
  Background pinner([&] { stuck_pin = elsewhere.pin(kStuckIova, kStuckPages * kPageSize); });
  ASSERT_TRUE(stuck.wait_fault(10000)) << "the pin never faulted";
  Result<uint64_t> unmapped = Error(EINPROGRESS, "");
  {
    Background unmapper([&] { unmapped = ioas->unmap(0x100000, kMiB); });
    const bool finished = unmapper.finishes_within(5s);
    if (!finished) stuck.resolve_all();
    ASSERT_TRUE(finished) << "the unmap waited for a pin of another range";
  }
  ASSERT_OK(unmapped);
  EXPECT_EQ(holder.calls, 1);
  EXPECT_EQ(holder.access->pin_count(), 0U);
  EXPECT_EQ(elsewhere.calls, 0);

  stuck.resolve_all();
  pinner.join();
  ASSERT_OK(stuck_pin);
  EXPECT_EQ(elsewhere.access->pin_count(), 1U);
  // Its own range: now it is called, and unpins.
  ASSERT_OK(ioas->unmap(kStuckIova, kStuckPages * kPageSize));
  EXPECT_EQ(elsewhere.calls, 1);
  EXPECT_EQ(elsewhere.access->pin_count(), 0U);
  EXPECT_EQ(counters().pinned_bytes, 0U);
}

// A driver of page pins (type1 vfio_pin_pages style) that drops the pages
// it holds in an unmapped range.
struct PagePinDriver {
  std::mutex mu;
  std::vector<uint64_t> pages;
  std::shared_ptr<Access> access;

  void on_unmap(const IovaRange& r) {
    std::lock_guard lk(mu);
    std::erase_if(pages, [&](uint64_t iova) {
      if (iova < r.start || iova > r.last) return false;
      EXPECT_OK(access->unpin_pages(iova, 1));
      return true;
    });
  }
};

TEST(UnmapProgress, StuckPagePinBlocksNeitherOtherUnmapsNorDirtyReads) {
  test::UserfaultRegion stuck(kStuckPages * kPageSize);
  IOMM_NEEDS(stuck.ok(),
             "userfaultfd for kernel-mode faults (vm.unprivileged_userfaultfd=1 when not root)");
  test::Memfd mfd(kMiB);
  auto ioas = Ioas::create({}).value();
  ioas->set_dirty_tracking(true);
  PagePinDriver drv;
  drv.access = Access::create(ioas, [&drv](const IovaRange& r) { drv.on_unmap(r); }).value();
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, kMiB), kRW, 0x100000));
  ASSERT_OK(
      ioas->map(*MemorySource::from_user(stuck.addr(), kStuckPages * kPageSize), kRW, kStuckIova));
  void* host = nullptr;
  ASSERT_OK(drv.access->pin_pages(0x100000, 1, kRW, &host));
  drv.pages.push_back(0x100000);

  Status stuck_pin = Error(EINPROGRESS, "");
  void* stuck_host[2] = {};
  Background pinner([&] { stuck_pin = drv.access->pin_pages(kStuckIova, 2, kRW, stuck_host); });
  ASSERT_TRUE(stuck.wait_fault(10000)) << "the pin never faulted";

  // While that pin waits on its fault: a dirty read (which reports pinned
  // pages) and the unmap of the other range (whose notification makes the
  // driver unpin there) both complete.
  std::vector<uint64_t> bitmap(kMiB / kPageSize / 64);
  Status read = Error(EINPROGRESS, "");
  {
    Background reader([&] { read = ioas->read_and_clear_dirty(0x100000, kMiB, bitmap); });
    const bool finished = reader.finishes_within(5s);
    if (!finished) stuck.resolve_all();
    ASSERT_TRUE(finished) << "the dirty read waited for the stuck pin";
  }
  ASSERT_OK(read);
  EXPECT_EQ(bitmap[0], 1U);  // the page pinned at 0x100000
  Result<uint64_t> unmapped = Error(EINPROGRESS, "");
  {
    Background unmapper([&] { unmapped = ioas->unmap(0x100000, kMiB); });
    const bool finished = unmapper.finishes_within(5s);
    if (!finished) stuck.resolve_all();
    ASSERT_TRUE(finished) << "the unmap of another range waited for the stuck pin";
  }
  ASSERT_OK(unmapped);
  EXPECT_FALSE(pinner.done());
  EXPECT_EQ(drv.access->page_pinned_count(), 0U);

  stuck.resolve_all();
  pinner.join();
  ASSERT_OK(stuck_pin);
  EXPECT_EQ(drv.access->page_pinned_count(), 2U);
  EXPECT_EQ(stuck_host[1], static_cast<char*>(stuck.addr()) + kPageSize);
  ASSERT_OK(drv.access->unpin_pages(kStuckIova, 2));
  ASSERT_OK(ioas->unmap_all());
  EXPECT_EQ(counters().pinned_bytes, 0U);
}

TEST(UnmapProgress, ConcurrentPagePinsOfOnePagePinItOnce) {
  test::Memfd mfd(kMiB);
  auto ioas = Ioas::create({}).value();
  auto access = Access::create(ioas, [](const IovaRange&) {}).value();
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, kMiB), kRW, 0x100000));
  constexpr int kThreads = 4;
  constexpr int kRounds = 200;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kRounds; ++i) {
        void* host[3] = {};
        EXPECT_OK(access->pin_pages(0x100000 + (i % 4) * kPageSize, 3, kRW, host));
        EXPECT_OK(access->unpin_pages(0x100000 + (i % 4) * kPageSize, 3));
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(access->page_pinned_count(), 0U);
  EXPECT_EQ(counters().pinned_bytes, 0U);
  EXPECT_EQ(ioas->mappings()[0].access_pins, 0U);
}

}  // namespace
}  // namespace iomm
