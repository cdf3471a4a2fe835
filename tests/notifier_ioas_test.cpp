// Interval notifiers on an IOAS: unmap and live-update events fire exactly
// over the overlapping part, before translations go, with no IOAS lock held;
// Ioas::host_segments.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "iomm/domain.hpp"
#include "iomm/ioas.hpp"
#include "iomm/notifier.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

constexpr uint32_t kRW = kProtRead | kProtWrite;
constexpr uint64_t kMiB = 1 << 20;
using test::Memfd;

struct NotifierIoas : testing::Test {
  Memfd mfd{4 * kMiB};
  std::shared_ptr<Ioas> ioas = Ioas::create({}).value();
  MemorySource low = MemorySource::from_file(mfd.fd(), 0, 2 * kMiB).value();
  MemorySource high = MemorySource::from_file(mfd.fd(), 2 * kMiB, kMiB).value();
  void SetUp() override {
    ASSERT_OK(ioas->map(low, kRW, 0x200000));
    ASSERT_OK(ioas->map(high, kProtRead, 0x400000));
  }
};

struct Recorder {
  std::vector<Invalidation> seen;
  InvalidateCallback callback() {
    return [this](IntervalNotifier& n, const Invalidation& inv, uint64_t seq) {
      seen.push_back(inv);
      n.set_seq(seq);
      return true;
    };
  }
};

TEST_F(NotifierIoas, UnmapFiresOnlyOverTheOverlappingPart) {
  Recorder across, inside_other, outside;
  auto a = IntervalNotifier::watch_iova(ioas, {0x300000, 0x4fffff}, across.callback()).value();
  auto b =
      IntervalNotifier::watch_iova(ioas, {0x400000, 0x400fff}, inside_other.callback()).value();
  auto c = IntervalNotifier::watch_iova(ioas, {0x600000, 0x700000}, outside.callback()).value();
  const uint64_t seq_a = a->read_begin();
  const uint64_t seq_b = b->read_begin();
  ASSERT_OK(ioas->unmap(0x200000, 2 * kMiB));
  ASSERT_EQ(across.seen.size(), 1U);
  EXPECT_EQ(across.seen[0].range, (IovaRange{0x300000, 0x3fffff}));
  EXPECT_EQ(across.seen[0].cause, InvalidationCause::unmap);
  EXPECT_FALSE(across.seen[0].blocking);
  EXPECT_TRUE(a->read_retry(seq_a));
  EXPECT_TRUE(inside_other.seen.empty());
  EXPECT_FALSE(b->read_retry(seq_b));
  EXPECT_TRUE(outside.seen.empty());
  // A failed unmap (cuts a mapping) delivers nothing.
  EXPECT_ERRNO(ioas->unmap(0x400000, 4096), ENOENT);
  EXPECT_TRUE(inside_other.seen.empty());
}

TEST_F(NotifierIoas, AdjacentMappingsAreOneEvent) {
  Recorder r;
  auto n = IntervalNotifier::watch_iova(ioas, {0, UINT64_MAX}, r.callback()).value();
  ASSERT_OK(ioas->unmap_all());
  ASSERT_EQ(r.seen.size(), 1U);
  EXPECT_EQ(r.seen[0].range, (IovaRange{0x200000, 0x4fffff}));
}

TEST_F(NotifierIoas, UnmapCallbackRunsBeforeTranslationsGoAndWithoutIoasLocks) {
  auto domain = SoftDomain::create({}).value();
  ASSERT_OK(ioas->attach(domain));
  std::vector<int> translate_errs;
  std::vector<int> segment_errs;
  size_t mappings_seen = 0;
  auto n = IntervalNotifier::watch_iova(ioas, {0x200000, 0x200fff},
                                        [&](IntervalNotifier&, const Invalidation&, uint64_t) {
                                          auto t = domain->translate(0x200000, kProtRead);
                                          translate_errs.push_back(t.ok() ? 0 : t.error().code());
                                          // Read-only entry points take IOAS locks: none is held.
                                          auto s = ioas->host_segments(0x200000, 4096, kProtRead);
                                          segment_errs.push_back(s.ok() ? 0 : s.error().code());
                                          mappings_seen = ioas->mappings().size();
                                          return true;
                                        })
               .value();
  ASSERT_OK(ioas->unmap(0x200000, 2 * kMiB));
  ASSERT_EQ(translate_errs.size(), 1U);
  EXPECT_EQ(translate_errs[0], 0) << "the translation was removed before the callback";
  // The mapping is being removed: no new host addresses for it.
  EXPECT_EQ(segment_errs[0], ENOENT);
  EXPECT_EQ(mappings_seen, 1U);  // only the other, live mapping is listed
  EXPECT_ERRNO(domain->translate(0x200000, kProtRead), EFAULT);
  ASSERT_OK(ioas->detach(domain));
}

TEST_F(NotifierIoas, ReadBeginAfterAnUnmapStartedFindsTheRangeUnmapped) {
  std::atomic<bool> entered{false};
  std::atomic<bool> release{false};
  auto n = IntervalNotifier::watch_iova(ioas, {0x200000, 0x3fffff},
                                        [&](IntervalNotifier&, const Invalidation&, uint64_t) {
                                          entered = true;
                                          while (!release) std::this_thread::yield();
                                          return true;
                                        })
               .value();
  std::thread unmapper([&] { EXPECT_OK(ioas->unmap(0x200000, 2 * kMiB)); });
  while (!entered) std::this_thread::yield();
  std::thread reader([&] {
    n->read_begin();
    // The invalidation ended: the mapping is gone, never half there.
    EXPECT_ERRNO(ioas->host_segments(0x200000, 4096, kProtRead), ENOENT);
    EXPECT_EQ(ioas->mappings().size(), 1U);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  release = true;
  unmapper.join();
  reader.join();
}

TEST_F(NotifierIoas, InvalidateHostFiresOverTheOverlap) {
  Recorder r, other;
  auto n = IntervalNotifier::watch_iova(ioas, {0x3ff000, 0x400fff}, r.callback()).value();
  auto o = IntervalNotifier::watch_iova(ioas, {0x400000, 0x400fff}, other.callback()).value();
  ASSERT_OK(ioas->host_segments(0x3ff000, 4096, kProtRead));
  EXPECT_EQ(*ioas->invalidate_host(0x200000, 2 * kMiB), 2 * kMiB);
  ASSERT_EQ(r.seen.size(), 1U);
  EXPECT_EQ(r.seen[0].range, (IovaRange{0x3ff000, 0x3fffff}));
  EXPECT_EQ(r.seen[0].cause, InvalidationCause::host_invalidate);
  EXPECT_TRUE(other.seen.empty());
  EXPECT_ERRNO(ioas->host_segments(0x3ff000, 4096, kProtRead), EBUSY);
  // A failed invalidation (already invalid) delivers nothing.
  EXPECT_ERRNO(ioas->invalidate_host(0x200000, 2 * kMiB), EINVAL);
  EXPECT_EQ(r.seen.size(), 1U);
  ASSERT_OK(ioas->replace_host(0x200000, low, {}));
  ASSERT_OK(ioas->host_segments(0x3ff000, 4096, kProtRead));
}

TEST_F(NotifierIoas, HostSegmentsMergeContiguousMemory) {
  // Both mappings are consecutive offsets of one file at consecutive IOVAs:
  // one segment.
  auto segs = ioas->host_segments(0x300000, 2 * kMiB, kProtRead);
  ASSERT_OK(segs);
  ASSERT_EQ(segs->size(), 1U);
  EXPECT_EQ((*segs)[0].iova, 0x300000U);
  EXPECT_EQ((*segs)[0].length, 2 * kMiB);
  EXPECT_EQ((*segs)[0].host, static_cast<std::byte*>(low.host_address()) + kMiB);
  EXPECT_TRUE((*segs)[0].library_mapped);
  std::memset((*segs)[0].host, 0x5a, 16);
  unsigned char byte = 0;
  auto domain = SoftDomain::create({}).value();
  ASSERT_OK(ioas->attach(domain));
  ASSERT_OK(domain->dma_read(0x300000, &byte, 1));
  EXPECT_EQ(byte, 0x5a);
  ASSERT_OK(ioas->detach(domain));
}

TEST_F(NotifierIoas, HostSegmentsErrors) {
  EXPECT_ERRNO(ioas->host_segments(0x200000, 0, kProtRead), EINVAL);
  EXPECT_ERRNO(ioas->host_segments(UINT64_MAX, 2, kProtRead), EOVERFLOW);
  EXPECT_ERRNO(ioas->host_segments(0x100000, 2 * kMiB, kProtRead), ENOENT);  // hole first
  EXPECT_ERRNO(ioas->host_segments(0x400000, 2 * kMiB, kProtRead), ENOENT);  // hole after
  EXPECT_ERRNO(ioas->host_segments(0x400000, 4096, kRW), EPERM);
  auto sim = MemorySource::simulated(kMiB).value();
  ASSERT_OK(ioas->map(sim, kRW, 0x1000000));
  EXPECT_ERRNO(ioas->host_segments(0x1000000, 4096, kProtRead), ENXIO);
}

// The appending form keeps what the caller's vector held: runs merge only
// within one call, and a failure part way leaves the vector as it was.
TEST_F(NotifierIoas, HostSegmentsAppendKeepsTheCallersRuns) {
  std::vector<Ioas::HostSegment> out;
  ASSERT_OK(ioas->host_segments(0x200000, 4096, kProtRead, out));
  // Contiguous with the first run in IOVA and host memory, but another call.
  ASSERT_OK(ioas->host_segments(0x201000, 4096, kProtRead, out));
  ASSERT_EQ(out.size(), 2U);
  EXPECT_EQ(out[1].iova, 0x201000U);
  EXPECT_EQ(out[1].length, 4096U);
  EXPECT_EQ(out[1].host, static_cast<std::byte*>(low.host_address()) + 4096);
  const std::vector<Ioas::HostSegment> before = out;
  auto same = [&] {
    if (out.size() != before.size()) return false;
    for (size_t i = 0; i < out.size(); ++i)
      if (out[i].iova != before[i].iova || out[i].length != before[i].length ||
          out[i].host != before[i].host || out[i].library_mapped != before[i].library_mapped)
        return false;
    return true;
  };
  // The writable mapping, then the read-only one: EPERM after a run.
  EXPECT_ERRNO(ioas->host_segments(0x3ff000, 8192, kRW, out), EPERM);
  EXPECT_TRUE(same());
  // Mapped, then a hole: ENOENT after a run.
  EXPECT_ERRNO(ioas->host_segments(0x4ff000, 8192, kProtRead, out), ENOENT);
  EXPECT_TRUE(same());
  EXPECT_ERRNO(ioas->host_segments(0x200000, 0, kProtRead, out), EINVAL);
  EXPECT_TRUE(same());
}

TEST_F(NotifierIoas, UserMemorySegmentsAreNotLibraryMapped) {
  std::vector<std::byte> buf(2 * 4096 + 4096);
  auto* aligned = reinterpret_cast<std::byte*>((reinterpret_cast<uintptr_t>(buf.data()) + 4095) &
                                               ~uintptr_t{4095});
  auto src = MemorySource::from_user(aligned, 2 * 4096).value();
  auto iova = ioas->map(src, kRW, 0x2000000);
  ASSERT_OK(iova);
  auto segs = ioas->host_segments(0x2000000, 2 * 4096, kRW);
  ASSERT_OK(segs);
  ASSERT_EQ(segs->size(), 1U);
  EXPECT_EQ((*segs)[0].host, aligned);
  EXPECT_FALSE((*segs)[0].library_mapped);
  ASSERT_OK(ioas->unmap(0x2000000, 2 * 4096));
}

}  // namespace
}  // namespace iomm
