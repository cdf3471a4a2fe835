// The userfaultfd monitor of this process's memory: which events arrive for
// munmap, madvise and mremap of watched memory, the registration rules, and
// the epoch protocol that keeps a copy from accepting discarded memory.
#include "monitor/event_monitor.hpp"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "iomm/source.hpp"
#include "mem/checked_copy.hpp"
#include "mem/file_object.hpp"
#include "test_support.hpp"

namespace iomm::monitor {
namespace {

constexpr size_t kLen = 8 * kPageSize;

struct Recorder {
  std::mutex mu;
  std::vector<MemoryEvent> events;
  std::vector<MemoryEvent> take() {
    std::lock_guard lk(mu);
    return std::exchange(events, {});
  }
};

std::unique_ptr<EventMonitor> start(Recorder& rec) {
  auto m = EventMonitor::start([&rec](const MemoryEvent& ev) {
    std::lock_guard lk(rec.mu);
    rec.events.push_back(ev);
  });
  EXPECT_TRUE(m.ok()) << m.error().describe();
  return m.ok() ? std::move(m).value() : nullptr;
}

char* anon(size_t len) {
  void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  EXPECT_NE(p, MAP_FAILED);
  return static_cast<char*>(p);
}

uint64_t addr(const void* p) { return reinterpret_cast<uint64_t>(p); }

bool same(const MemoryEvent& a, const MemoryEvent& b) {
  return a.start == b.start && a.last == b.last && a.cause == b.cause;
}

// The kernel holds munmap, madvise and mremap until their event has been
// read, which is after the monitor started the batch: so the batch has
// started when the call returns, and settle() waits until the sink ran.
std::vector<MemoryEvent> after(EventMonitor& m, Recorder& rec, uint64_t epoch) {
  EXPECT_NE(m.started(), epoch);
  EXPECT_OK(m.settle());
  return rec.take();
}

TEST(EventMonitor, MunmapDiscardAndRemapOfWatchedMemoryAreReported) {
  Recorder rec;
  auto m = start(rec);
  ASSERT_NE(m, nullptr);
  char* p = anon(kLen);
  std::memset(p, 'x', kLen);  // no fault reaches the monitor: nothing is write-protected
  ASSERT_OK(m->watch(addr(p), kLen));

  uint64_t e = m->started();
  ASSERT_EQ(madvise(p, kPageSize, MADV_DONTNEED), 0);
  auto evs = after(*m, rec, e);
  ASSERT_EQ(evs.size(), 1U);
  EXPECT_TRUE(same(
      evs[0], MemoryEvent{nullptr, addr(p), addr(p) + kPageSize - 1, InvalidationCause::discard}));
  EXPECT_EQ(evs[0].object, mem::user_object().get());

  e = m->started();
  ASSERT_EQ(munmap(p + 2 * kPageSize, kPageSize), 0);
  evs = after(*m, rec, e);
  ASSERT_EQ(evs.size(), 1U);
  EXPECT_TRUE(same(evs[0], MemoryEvent{nullptr, addr(p) + 2 * kPageSize,
                                       addr(p) + 3 * kPageSize - 1, InvalidationCause::munmap}));

  // Moved elsewhere: the old addresses are reported as remapped.
  char* dest = anon(kPageSize);
  e = m->started();
  void* moved =
      mremap(p + 4 * kPageSize, kPageSize, kPageSize, MREMAP_MAYMOVE | MREMAP_FIXED, dest);
  ASSERT_EQ(moved, dest);
  evs = after(*m, rec, e);
  ASSERT_FALSE(evs.empty());
  EXPECT_TRUE(same(evs[0], MemoryEvent{nullptr, addr(p) + 4 * kPageSize,
                                       addr(p) + 5 * kPageSize - 1, InvalidationCause::remap}));

  // Replaced in place by a MAP_FIXED mapping: an unmap of the old memory.
  e = m->started();
  ASSERT_EQ(
      mmap(p + 6 * kPageSize, kPageSize, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0),
      p + 6 * kPageSize);
  evs = after(*m, rec, e);
  ASSERT_EQ(evs.size(), 1U);
  EXPECT_TRUE(same(evs[0], MemoryEvent{nullptr, addr(p) + 6 * kPageSize,
                                       addr(p) + 7 * kPageSize - 1, InvalidationCause::munmap}));

  const MonitorCounts c = m->counts();
  EXPECT_EQ(c.removes, 1U);
  EXPECT_EQ(c.remaps, 1U);
  EXPECT_GE(c.unmaps, 2U);
  munmap(dest, kPageSize);
  munmap(p, kLen);
}

TEST(EventMonitor, SharedMemoryCanBeWatched) {
  Recorder rec;
  auto m = start(rec);
  ASSERT_NE(m, nullptr);
  void* v = mmap(nullptr, kLen, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(v, MAP_FAILED);
  auto* p = static_cast<char*>(v);
  std::memset(p, 's', kLen);
  ASSERT_OK(m->watch(addr(p), kLen));
  const uint64_t e = m->started();
  ASSERT_EQ(madvise(p + kPageSize, kPageSize, MADV_REMOVE), 0);
  const auto evs = after(*m, rec, e);
  ASSERT_EQ(evs.size(), 1U);
  EXPECT_TRUE(same(evs[0], MemoryEvent{nullptr, addr(p) + kPageSize, addr(p) + 2 * kPageSize - 1,
                                       InvalidationCause::discard}));
  munmap(p, kLen);
}

TEST(EventMonitor, WatchErrorsLeaveNothingRegistered) {
  Recorder rec;
  auto m = start(rec);
  ASSERT_NE(m, nullptr);
  char* p = anon(3 * kPageSize);
  EXPECT_ERRNO(m->watch(addr(p), 0), EINVAL);
  EXPECT_ERRNO(m->watch(UINT64_MAX - kPageSize, 2 * kPageSize), EOVERFLOW);
  // A hole in the middle: the mapped parts are not left registered.
  ASSERT_EQ(munmap(p + kPageSize, kPageSize), 0);
  EXPECT_ERRNO(m->watch(addr(p), 3 * kPageSize), EFAULT);
  uint64_t e = m->started();
  ASSERT_EQ(madvise(p, kPageSize, MADV_DONTNEED), 0);
  EXPECT_EQ(m->started(), e) << "an unregistered range produced an event";
  // Nothing mapped at all, and file memory userfaultfd cannot watch.
  EXPECT_ERRNO(m->watch(addr(p) + kPageSize, kPageSize), EINVAL);
  char path[] = "/tmp/iomm-uffd-XXXXXX";
  const int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  unlink(path);
  ASSERT_EQ(ftruncate(fd, kPageSize), 0);
  void* f = mmap(nullptr, kPageSize, PROT_READ, MAP_SHARED, fd, 0);
  ASSERT_NE(f, MAP_FAILED);
  EXPECT_ERRNO(m->watch(addr(f), kPageSize), EINVAL);
  munmap(f, kPageSize);
  close(fd);
  munmap(p, 3 * kPageSize);
  EXPECT_TRUE(rec.take().empty());
}

TEST(EventMonitor, WatchesAreCountedAndTheLastUnwatchUnregisters) {
  Recorder rec;
  auto m = start(rec);
  ASSERT_NE(m, nullptr);
  char* p = anon(4 * kPageSize);
  ASSERT_OK(m->watch(addr(p), 4 * kPageSize));
  ASSERT_OK(m->watch(addr(p) + kPageSize, kPageSize));
  m->unwatch(addr(p), 4 * kPageSize);
  // Page 1 is still watched, the others are not.
  uint64_t e = m->started();
  ASSERT_EQ(madvise(p, kPageSize, MADV_DONTNEED), 0);
  EXPECT_EQ(m->started(), e);
  ASSERT_EQ(madvise(p + kPageSize, kPageSize, MADV_DONTNEED), 0);
  auto evs = after(*m, rec, e);
  ASSERT_EQ(evs.size(), 1U);
  EXPECT_EQ(evs[0].start, addr(p) + kPageSize);
  m->unwatch(addr(p) + kPageSize, kPageSize);
  e = m->started();
  ASSERT_EQ(munmap(p, 4 * kPageSize), 0);
  EXPECT_EQ(m->started(), e);
  EXPECT_TRUE(rec.take().empty());
}

// A reader copies watched memory with a guarded copy under a sequence the
// sink makes odd, while a writer discards the memory and fills it again:
// every copy the epoch protocol accepts holds the fill, never the zeros of
// the discarded pages.
TEST(EventMonitor, CopiesThatRacedWithADiscardAreRejected) {
  std::atomic<uint64_t> seq{0};  // odd from the discard to the refill
  auto started = EventMonitor::start([&seq](const MemoryEvent&) {
    if ((seq.load() & 1) == 0) seq.fetch_add(1);
  });
  ASSERT_OK(started);
  auto& m = **started;
  char* p = anon(kPageSize);
  std::memset(p, 'f', kPageSize);
  ASSERT_OK(m.watch(addr(p), kPageSize));
  constexpr int kRounds = 300;
  std::atomic<bool> stop{false};
  uint64_t accepted = 0;
  uint64_t rejected = 0;
  std::thread reader([&] {
    std::vector<char> buf(kPageSize);
    while (!stop.load()) {
      const uint64_t s = seq.load();
      if ((s & 1) != 0) continue;
      const bool copied = mem::checked_read(buf.data(), addr(p), kPageSize);
      ASSERT_OK(m.settle());
      if (!copied || seq.load() != s) {
        ++rejected;
        continue;
      }
      ++accepted;
      ASSERT_EQ(buf[0], 'f');
      ASSERT_EQ(buf[kPageSize - 1], 'f');
    }
  });
  for (int i = 0; i < kRounds; ++i) {
    ASSERT_EQ(madvise(p, kPageSize, MADV_DONTNEED), 0);
    ASSERT_OK(m.settle());
    ASSERT_EQ(seq.load() & 1, 1U);
    std::memset(p, 'f', kPageSize);
    seq.fetch_add(1);
  }
  stop = true;
  reader.join();
  EXPECT_EQ(m.counts().removes, static_cast<uint64_t>(kRounds));
  RecordProperty("accepted", std::to_string(accepted));
  RecordProperty("rejected", std::to_string(rejected));
  munmap(p, kPageSize);
}

TEST(EventMonitor, SettleFromTheMonitorThreadIsRefused) {
  std::atomic<EventMonitor*> self{nullptr};
  std::atomic<int> code{-1};
  auto started =
      EventMonitor::start([&](const MemoryEvent&) { code = self.load()->settle().code(); });
  ASSERT_OK(started);
  self = started->get();
  EventMonitor* mon = self.load();
  char* p = anon(kPageSize);
  ASSERT_OK(mon->watch(addr(p), kPageSize));
  ASSERT_EQ(munmap(p, kPageSize), 0);
  ASSERT_OK(mon->settle());
  EXPECT_EQ(code.load(), EDEADLK);
}

// The truncating thread does not wait for the monitor: wait for the event
// (bounded; a missing event fails the test rather than hanging it).
bool wait_for_event(Recorder& rec) {
  for (int i = 0; i < 10000; ++i) {
    {
      std::lock_guard lk(rec.mu);
      if (!rec.events.empty()) return true;
    }
    usleep(1000);
  }
  return false;
}

TEST(EventMonitor, TruncationOfAWatchedFileIsReported) {
  Recorder rec;
  auto m = start(rec);
  ASSERT_NE(m, nullptr);
  test::Memfd mfd(4 * kPageSize, 0, test::Shrink::allowed);
  auto src = MemorySource::from_file(mfd.fd(), 0, 4 * kPageSize, FileSeal::allow_shrink);
  ASSERT_OK(src);
  auto file = std::static_pointer_cast<mem::FileObject>(src->object());
  ASSERT_OK(m->watch_file(file));
  ASSERT_OK(m->watch_file(file));
  m->unwatch_file(*file);  // counted: still watched
  ASSERT_EQ(ftruncate(mfd.fd(), kPageSize), 0);
  ASSERT_TRUE(wait_for_event(rec));
  const auto evs = rec.take();
  ASSERT_EQ(evs.size(), 1U);
  EXPECT_EQ(evs[0].object, file.get());
  EXPECT_TRUE(same(
      evs[0], MemoryEvent{nullptr, kPageSize, 4 * kPageSize - 1, InvalidationCause::truncate}));
  EXPECT_EQ(m->counts().truncations, 1U);
  m->unwatch_file(*file);
}

TEST(EventMonitor, WorksForAnOrdinaryUser) {
  const int status = test::run_unprivileged([] {
    Recorder rec;
    auto m = start(rec);
    ASSERT_NE(m, nullptr);
    char* p = anon(kPageSize);
    ASSERT_OK(m->watch(addr(p), kPageSize));
    const uint64_t e = m->started();
    ASSERT_EQ(munmap(p, kPageSize), 0);
    const auto evs = after(*m, rec, e);
    ASSERT_EQ(evs.size(), 1U);
    EXPECT_EQ(evs[0].cause, InvalidationCause::munmap);
  });
  EXPECT_EQ(status, 0);
}

}  // namespace
}  // namespace iomm::monitor
