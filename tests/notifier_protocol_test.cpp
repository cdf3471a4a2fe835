// Interval notifiers (seed 002): registration errors, the read_begin /
// read_retry sequence protocol, non-blocking refusal then blocking retry,
// and unregistration waiting for a running callback.
#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "iomm/ioas.hpp"
#include "iomm/notifier.hpp"
#include "mem/mem_object.hpp"
#include "notify/invalidate.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

constexpr uint64_t kMiB = 1 << 20;
using test::Memfd;

InvalidateCallback accept_all() {
  return [](IntervalNotifier&, const Invalidation&, uint64_t) { return true; };
}

TEST(NotifierProtocol, RegistrationErrors) {
  auto ioas = Ioas::create({}).value();
  EXPECT_ERRNO(IntervalNotifier::watch_iova(ioas, {0, 4095}, nullptr), EINVAL);
  EXPECT_ERRNO(IntervalNotifier::watch_iova(ioas, {4096, 4095}, accept_all()), EINVAL);
  EXPECT_ERRNO(IntervalNotifier::watch_iova(nullptr, {0, 4095}, accept_all()), EINVAL);
  Memfd mfd(kMiB);
  auto src = MemorySource::from_file(mfd.fd(), 0, kMiB).value();
  EXPECT_ERRNO(IntervalNotifier::watch_source(src, nullptr), EINVAL);
  // The whole 64-bit space is expressible.
  auto all = IntervalNotifier::watch_iova(ioas, {0, UINT64_MAX}, accept_all());
  ASSERT_OK(all);
  EXPECT_EQ((*all)->range(), (IovaRange{0, UINT64_MAX}));
  EXPECT_EQ((*all)->invalidations(), 0U);
}

TEST(NotifierProtocol, ReadRetryIsTrueOnlyAfterAnInvalidationStarted) {
  Memfd mfd(kMiB);
  auto src = MemorySource::from_file(mfd.fd(), 0, kMiB).value();
  auto n = IntervalNotifier::watch_source(src, accept_all()).value();
  const uint64_t seq = n->read_begin();
  EXPECT_FALSE(n->read_retry(seq));
  // Outside the notifier's range: no effect.
  notify::invalidate_source(*src.object(), {kMiB, 2 * kMiB - 1}, InvalidationCause::truncate);
  EXPECT_FALSE(n->read_retry(seq));
  EXPECT_EQ(n->invalidations(), 0U);
  notify::invalidate_source(*src.object(), {kMiB - 1, kMiB}, InvalidationCause::truncate);
  EXPECT_TRUE(n->read_retry(seq));
  EXPECT_EQ(n->invalidations(), 1U);
  const uint64_t again = n->read_begin();
  EXPECT_NE(again, seq);
  EXPECT_FALSE(n->read_retry(again));
}

TEST(NotifierProtocol, SourcesOfOneFileShareNotifiersAndSeeOffsets) {
  Memfd mfd(4 * kMiB);
  auto low = MemorySource::from_file(mfd.fd(), 0, 2 * kMiB).value();
  auto high = MemorySource::from_file(mfd.fd(), 2 * kMiB, 2 * kMiB).value();
  ASSERT_EQ(low.object(), high.object());
  std::vector<Invalidation> seen;
  auto n = IntervalNotifier::watch_source(high, [&](IntervalNotifier& self, const Invalidation& inv,
                                                    uint64_t seq) {
             seen.push_back(inv);
             self.set_seq(seq);
             return true;
           }).value();
  EXPECT_EQ(n->range(), (IovaRange{2 * kMiB, 4 * kMiB - 1}));
  // An event on offsets the other source covers reaches the notifier only
  // where the ranges overlap.
  notify::invalidate_source(*low.object(), {kMiB, 3 * kMiB - 1}, InvalidationCause::discard);
  ASSERT_EQ(seen.size(), 1U);
  EXPECT_EQ(seen[0].range, (IovaRange{2 * kMiB, 3 * kMiB - 1}));
  EXPECT_EQ(seen[0].cause, InvalidationCause::discard);
  EXPECT_FALSE(seen[0].blocking);
}

TEST(NotifierProtocol, ARefusalIsRetriedBlockingAfterEveryNonBlockingCallback) {
  Memfd mfd(kMiB);
  auto src = MemorySource::from_file(mfd.fd(), 0, kMiB).value();
  std::vector<std::pair<int, bool>> calls;  // (notifier, blocking)
  auto refuser = IntervalNotifier::watch_source(src, [&](IntervalNotifier&, const Invalidation& inv,
                                                         uint64_t) {
                   calls.emplace_back(1, inv.blocking);
                   return inv.blocking;
                 }).value();
  auto acceptor = IntervalNotifier::watch_source(src, [&](IntervalNotifier&,
                                                          const Invalidation& inv, uint64_t) {
                    calls.emplace_back(2, inv.blocking);
                    return true;
                  }).value();
  notify::invalidate_source(*src.object(), {0, 4095}, InvalidationCause::munmap);
  // Both non-blocking calls first (registration order), then the refuser
  // again, blocking; the acceptor is not called twice.
  const std::vector<std::pair<int, bool>> expected{{1, false}, {2, false}, {1, true}};
  EXPECT_EQ(calls, expected);
  EXPECT_EQ(refuser->invalidations(), 1U);
  EXPECT_EQ(acceptor->invalidations(), 1U);
}

TEST(NotifierProtocol, ReadBeginWaitsForTheInvalidationToEnd) {
  Memfd mfd(kMiB);
  auto src = MemorySource::from_file(mfd.fd(), 0, kMiB).value();
  std::atomic<bool> event_done{false};
  std::atomic<bool> in_callback{false};
  auto n =
      IntervalNotifier::watch_source(src, [&](IntervalNotifier&, const Invalidation&, uint64_t) {
        in_callback = true;
        return true;
      }).value();
  std::atomic<bool> saw_done_after_begin{false};
  std::thread reader;
  {
    notify::SourceInvalidation inv(*src.object(), {0, kMiB - 1}, InvalidationCause::revoke);
    ASSERT_TRUE(in_callback);
    reader = std::thread([&] {
      n->read_begin();
      saw_done_after_begin = event_done.load();
    });
    // The event itself, between the callbacks and the end of the window.
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    event_done = true;
  }
  reader.join();
  EXPECT_TRUE(saw_done_after_begin);
}

TEST(NotifierProtocol, DestroyingWaitsForARunningCallback) {
  Memfd mfd(kMiB);
  auto src = MemorySource::from_file(mfd.fd(), 0, kMiB).value();
  std::mutex mu;
  std::condition_variable cv;
  bool entered = false;
  bool release = false;
  std::atomic<bool> destroyed{false};
  std::atomic<bool> destroyed_while_running{false};
  auto n = IntervalNotifier::watch_source(src, [&](IntervalNotifier& self, const Invalidation&,
                                                   uint64_t seq) {
             std::unique_lock lk(mu);
             entered = true;
             cv.notify_all();
             cv.wait(lk, [&] { return release; });
             destroyed_while_running = destroyed.load();
             self.set_seq(seq);  // the notifier is still alive (ASan checks)
             return true;
           }).value();
  std::thread invalidator([&] {
    notify::invalidate_source(*src.object(), {0, 4095}, InvalidationCause::munmap);
  });
  {
    std::unique_lock lk(mu);
    cv.wait(lk, [&] { return entered; });
  }
  std::thread destroyer([&] {
    n.reset();
    destroyed = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_FALSE(destroyed.load());
  {
    std::lock_guard lk(mu);
    release = true;
  }
  cv.notify_all();
  destroyer.join();
  invalidator.join();
  EXPECT_TRUE(destroyed.load());
  EXPECT_FALSE(destroyed_while_running.load());
}

TEST(NotifierProtocol, ManyNotifiersAreAllCalledOnce) {
  // More than one delivery batch.
  Memfd mfd(kMiB);
  auto src = MemorySource::from_file(mfd.fd(), 0, kMiB).value();
  std::vector<std::unique_ptr<IntervalNotifier>> ns;
  std::atomic<int> calls{0};
  for (int i = 0; i < 200; ++i) {
    auto piece = src.slice(static_cast<uint64_t>(i) * 4096, 4096);
    ns.push_back(IntervalNotifier::watch_source(piece, [&](IntervalNotifier&, const Invalidation&,
                                                           uint64_t) {
                   ++calls;
                   return true;
                 }).value());
  }
  // One wide notifier that starts before all of them.
  ns.push_back(
      IntervalNotifier::watch_source(src, [&](IntervalNotifier&, const Invalidation&, uint64_t) {
        ++calls;
        return true;
      }).value());
  notify::invalidate_source(*src.object(), {50 * 4096, 150 * 4096 - 1}, InvalidationCause::discard);
  EXPECT_EQ(calls.load(), 101);
  for (int i = 0; i < 200; ++i) EXPECT_EQ(ns[i]->invalidations(), (i >= 50 && i < 150) ? 1U : 0U);
}

TEST(NotifierProtocol, CauseNames) {
  EXPECT_STREQ(to_string(InvalidationCause::unmap), "unmap");
  EXPECT_STREQ(to_string(InvalidationCause::host_invalidate), "host_invalidate");
  EXPECT_STREQ(to_string(InvalidationCause::munmap), "munmap");
  EXPECT_STREQ(to_string(InvalidationCause::discard), "discard");
  EXPECT_STREQ(to_string(InvalidationCause::remap), "remap");
  EXPECT_STREQ(to_string(InvalidationCause::truncate), "truncate");
  EXPECT_STREQ(to_string(InvalidationCause::revoke), "revoke");
}

}  // namespace
}  // namespace iomm
