// Files that may shrink (FileSeal::allow_shrink): a truncation while the
// library copies from the file gives EFAULT, never a crash, and a watched
// source's notifiers see it as an invalidation (cause truncate).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <mutex>
#include <thread>
#include <vector>

#include "iomm/domain.hpp"
#include "iomm/ioas.hpp"
#include "iomm/memory_monitor.hpp"
#include "iomm/notifier.hpp"
#include "iomm/source.hpp"
#include "iomm/vring_cache.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

constexpr uint64_t kLen = 16 * kPageSize;
constexpr uint64_t kIova = 0x100000;

struct Seen {
  std::mutex mu;
  std::vector<Invalidation> invalidations;
  size_t count() {
    std::lock_guard lk(mu);
    return invalidations.size();
  }
};

// The truncating thread does not wait for the monitor (inotify): wait for
// the invalidation, bounded.
bool wait_for(Seen& seen) {
  for (int i = 0; i < 10000 && seen.count() == 0; ++i) usleep(1000);
  return seen.count() != 0;
}

TEST(ShrinkingFile, TruncateDuringCopiesIsEfaultAndAnInvalidation) {
  test::Memfd mfd(kLen, 0, test::Shrink::allowed);
  auto src = MemorySource::from_file(mfd.fd(), 0, kLen, FileSeal::allow_shrink);
  ASSERT_OK(src);
  Seen seen;
  auto n = IntervalNotifier::watch_source(
      *src, [&seen](IntervalNotifier& self, const Invalidation& inv, uint64_t seq) {
        self.set_seq(seq);
        std::lock_guard lk(seen.mu);
        seen.invalidations.push_back(inv);
        return true;
      });
  ASSERT_OK(n);
  auto watch = MemoryWatch::create(*src);
  ASSERT_OK(watch);
  auto ioas = Ioas::create({}).value();
  auto domain = SoftDomain::create({}).value();
  ASSERT_OK(ioas->attach(domain));
  ASSERT_OK(ioas->map(*src, kProtRead | kProtWrite, kIova));

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> copies{0};
  std::atomic<uint64_t> faults{0};
  std::atomic<int> unexpected{0};
  std::thread copier([&] {
    std::vector<char> buf(kLen);
    while (!stop.load()) {
      const Status s = domain->dma_read(kIova, buf.data(), buf.size());
      if (s.ok()) {
        copies.fetch_add(1);
      } else if (s.code() == EFAULT) {
        faults.fetch_add(1);
      } else {
        unexpected.fetch_add(1);
      }
    }
  });
  while (copies.load() < 10) std::this_thread::yield();
  ASSERT_EQ(ftruncate(mfd.fd(), 4 * kPageSize), 0);
  ASSERT_TRUE(wait_for(seen));
  while (faults.load() < 10) std::this_thread::yield();
  stop = true;
  copier.join();
  EXPECT_EQ(unexpected.load(), 0);
  {
    std::lock_guard lk(seen.mu);
    ASSERT_EQ(seen.invalidations.size(), 1U);
    EXPECT_EQ(seen.invalidations[0].cause, InvalidationCause::truncate);
    EXPECT_EQ(seen.invalidations[0].range.start, 4 * kPageSize);
    EXPECT_EQ(seen.invalidations[0].range.last, kLen - 1);
  }
  char byte = 0;
  EXPECT_ERRNO(domain->dma_read(kIova + 8 * kPageSize, &byte, 1), EFAULT);
  EXPECT_OK(domain->dma_read(kIova + kPageSize, &byte, 1));
  EXPECT_EQ(memory_monitor_stats().truncations, 1U);
  ASSERT_OK(ioas->unmap_all());
  ASSERT_OK(ioas->detach(domain));
}

// A ring in a file that may shrink is never cached: its accesses are
// guarded copies, and a truncated ring is EFAULT.
TEST(ShrinkingFile, RingInAShrinkableFileIsCopiedAndTruncationIsEfault) {
  test::Memfd mfd(kLen, 0, test::Shrink::allowed);
  auto src = MemorySource::from_file(mfd.fd(), 0, kLen, FileSeal::allow_shrink);
  ASSERT_OK(src);
  auto ioas = Ioas::create({}).value();
  ASSERT_OK(ioas->map(*src, kProtRead | kProtWrite, kIova));
  auto cache =
      VringCache::create(ioas, {kIova, kIova + 4 * kPageSize, kIova + 8 * kPageSize, 16, false});
  ASSERT_OK(cache);
  EXPECT_FALSE((*cache)->cached());
  EXPECT_OK((*cache)->desc(3));
  ASSERT_EQ(ftruncate(mfd.fd(), 0), 0);
  EXPECT_ERRNO((*cache)->desc(3), EFAULT);
  EXPECT_ERRNO((*cache)->set_used_idx(1), EFAULT);
  EXPECT_EQ((*cache)->stats().cached_batches, 0U);
}

}  // namespace
}  // namespace iomm
