// Interval notifiers under concurrency (run under TSan too): a consumer
// caching host pointers under read_begin / read_retry while another thread
// maps and unmaps the range; no pointer survives its mapping's unmap.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <thread>

#include "iomm/ioas.hpp"
#include "iomm/notifier.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kIova = 0x400000;
using test::Memfd;

TEST(NotifierStress, CachedPointersNeverOutliveTheirMapping) {
  Memfd mfd_a(kMiB);
  Memfd mfd_b(kMiB);
  auto a = MemorySource::from_file(mfd_a.fd(), 0, kMiB).value();
  auto b = MemorySource::from_file(mfd_b.fd(), 0, kMiB).value();
  std::memset(a.host_address(), 0xa, kMiB);
  std::memset(b.host_address(), 0xb, kMiB);
  auto ioas = Ioas::create({}).value();

  std::mutex mu;
  const unsigned char* cached = nullptr;  // mu
  unsigned char expected = 0;             // mu
  std::atomic<uint64_t> callbacks{0};
  auto n = IntervalNotifier::watch_iova(
               ioas, {kIova, kIova + kMiB - 1},
               [&](IntervalNotifier& self, const Invalidation& inv, uint64_t seq) {
                 std::unique_lock lk(mu, std::defer_lock);
                 if (!inv.blocking) {
                   if (!lk.try_lock()) return false;
                 } else {
                   lk.lock();
                 }
                 self.set_seq(seq);
                 cached = nullptr;
                 ++callbacks;
                 return true;
               })
               .value();

  constexpr int kRounds = 300;
  std::atomic<bool> done{false};
  std::atomic<uint64_t> uses{0};
  std::thread consumer([&] {
    while (!done.load()) {
      const uint64_t seq = n->read_begin();
      auto segs = ioas->host_segments(kIova + 4096, 64, kProtRead);
      std::lock_guard lk(mu);
      if (n->read_retry(seq)) continue;
      if (segs.ok()) {
        cached = static_cast<const unsigned char*>((*segs)[0].host);
        expected = cached == static_cast<unsigned char*>(a.host_address()) + 4096 ? 0xa : 0xb;
      }
      if (cached != nullptr) {
        // A plain load through the cached pointer, under the consumer lock.
        EXPECT_EQ(cached[0], expected);
        ++uses;
      }
    }
  });
  for (int i = 0; i < kRounds; ++i) {
    const MemorySource& src = (i % 2 == 0) ? a : b;
    ASSERT_OK(ioas->map(src, kProtRead, kIova));
    if (i % 8 == 0) {
      ASSERT_OK(ioas->invalidate_host(kIova, kMiB));
      std::lock_guard lk(mu);
      EXPECT_EQ(cached, nullptr) << "a pointer outlived invalidate_host";
    }
    ASSERT_OK(ioas->unmap(kIova, kMiB));
    std::lock_guard lk(mu);
    EXPECT_EQ(cached, nullptr) << "a pointer outlived its mapping's unmap";
  }
  done = true;
  consumer.join();
  EXPECT_GE(callbacks.load(), static_cast<uint64_t>(kRounds));
}

TEST(NotifierStress, ConcurrentRegistrationAndInvalidation) {
  Memfd mfd(4 * kMiB);
  auto src = MemorySource::from_file(mfd.fd(), 0, 4 * kMiB).value();
  auto ioas = Ioas::create({}).value();
  std::atomic<bool> done{false};
  std::thread mapper([&] {
    for (int i = 0; i < 200; ++i) {
      ASSERT_OK(ioas->map(src, kProtRead, kIova));
      ASSERT_OK(ioas->unmap(kIova, 4 * kMiB));
    }
    done = true;
  });
  std::thread watcher([&] {
    uint64_t i = 0;
    while (!done.load()) {
      const uint64_t start = kIova + (i++ % 64) * 65536;
      auto n = IntervalNotifier::watch_iova(
          ioas, {start, start + 65535},
          [](IntervalNotifier& self, const Invalidation&, uint64_t seq) {
            self.set_seq(seq);
            return true;
          });
      ASSERT_OK(n);
      const uint64_t seq = (*n)->read_begin();
      (void)(*n)->read_retry(seq);
    }
  });
  mapper.join();
  watcher.join();
}

}  // namespace
}  // namespace iomm
