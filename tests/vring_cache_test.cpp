// The virtqueue metadata cache: cached pointers over library-mapped rings,
// rings spanning mappings, fallback to translated copies on invalidation and
// re-validation, user memory never cached, errors; batches (one handshake
// per pass: an invalidation is seen between batches only, a non-blocking
// callback refuses during one and the blocking retry waits for its end);
// Batch::run's Direct view (chosen once per pass, its sticky error kept
// with no test per access); and stress tests in which a data path processes
// the ring, access by access, in batches or in Direct passes, while another thread replaces the
// mapping, checking that no access used a stale pointer.
#include "iomm/vring_cache.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "iomm/ioas.hpp"
#include "iomm/notifier.hpp"
#include "iomm/source.hpp"
#include "test_support.hpp"
#include "userfault_region.hpp"

namespace iomm {
namespace {

constexpr uint32_t kRW = kProtRead | kProtWrite;
constexpr uint16_t kSize = 64;
constexpr uint64_t kIova = 0x100000;
constexpr uint64_t kRingBytes = 3 * kPageSize;  // desc, avail, used: a page each
constexpr uint64_t kDesc = 0;
constexpr uint64_t kAvail = kPageSize;
constexpr uint64_t kUsed = 2 * kPageSize;

VringLayout layout_at(uint64_t iova, bool event_idx = false) {
  return {iova + kDesc, iova + kAvail, iova + kUsed, kSize, event_idx};
}

// Fill a ring whose contents identify `gen`: descriptor i has addr
// gen << 32 | i, len gen, and the available ring lists every descriptor.
void fill_ring(std::byte* base, uint32_t gen) {
  for (uint16_t i = 0; i < kSize; ++i) {
    VringDesc d{(uint64_t{gen} << 32) | i, gen, 0, static_cast<uint16_t>((i + 1) % kSize)};
    std::memcpy(base + kDesc + 16ULL * i, &d, sizeof(d));
    std::memcpy(base + kAvail + 4 + 2ULL * i, &i, 2);
  }
  const uint16_t flags = 1;
  const uint16_t idx = kSize;
  const uint16_t used_event = 7;
  std::memcpy(base + kAvail, &flags, 2);
  std::memcpy(base + kAvail + 2, &idx, 2);
  std::memcpy(base + kAvail + 4 + 2ULL * kSize, &used_event, 2);
}

// The used ring in memory, as the driver reads it.
class UsedRingView {
 public:
  explicit UsedRingView(const void* ring_base)
      : used_(static_cast<const std::byte*>(ring_base) + kUsed) {}
  [[nodiscard]] uint16_t flags() const { return read<uint16_t>(0); }
  [[nodiscard]] uint16_t idx() const { return read<uint16_t>(2); }
  [[nodiscard]] uint32_t id(uint16_t slot) const { return read<uint32_t>(4 + 8ULL * slot); }
  [[nodiscard]] uint32_t len(uint16_t slot) const { return read<uint32_t>(8 + 8ULL * slot); }
  [[nodiscard]] uint16_t avail_event() const { return read<uint16_t>(4 + 8ULL * kSize); }

 private:
  template <typename T>
  [[nodiscard]] T read(uint64_t offset) const {
    T value;
    std::memcpy(&value, used_ + offset, sizeof(value));
    return value;
  }
  const std::byte* used_;
};

// A sealed memfd holding one ring.
struct RingFile {
  explicit RingFile(uint32_t gen, uint64_t size = kRingBytes) : mfd(size) {
    source = MemorySource::from_file(mfd.fd(), 0, size).value();
    fill_ring(static_cast<std::byte*>(source.host_address()), gen);
  }
  [[nodiscard]] std::byte* host() const { return static_cast<std::byte*>(source.host_address()); }
  test::Memfd mfd;
  MemorySource source = MemorySource::simulated(1).value();
};

// One ring, generation `gen`, mapped at kIova, and a cache over it.
struct MappedRing {
  MappedRing(uint32_t gen, bool event_idx) : ring(gen) {
    EXPECT_OK(ioas->map(ring.source, kRW, kIova));
    cache = VringCache::create(ioas, layout_at(kIova, event_idx)).value();
  }
  RingFile ring;
  std::shared_ptr<Ioas> ioas = Ioas::create({}).value();
  std::unique_ptr<VringCache> cache;
};

// Two generations of a ring, the first mapped at kIova, and a cache over
// it (the scenes that replace one mapping by another).
struct TwoRings {
  TwoRings() {
    EXPECT_OK(ioas->map(first.source, kRW, kIova));
    cache = VringCache::create(ioas, layout_at(kIova)).value();
  }
  RingFile first{1};
  RingFile second{2};
  std::shared_ptr<Ioas> ioas = Ioas::create({}).value();
  std::unique_ptr<VringCache> cache;
};

// A descriptor table over two mappings of different files, which meet 8
// bytes into descriptor 39 (no domain: byte-granular mappings); descriptor
// i is {1000 + i, i}.
struct SplitTable {
  static constexpr uint64_t kCut = kRingBytes - 8;  // where the first mapping ends
  static constexpr uint64_t kTable = kRingBytes - 640;
  SplitTable() {
    EXPECT_OK(ioas->map(first.source.slice(0, kCut), kRW, kIova));
    EXPECT_OK(ioas->map(second, kRW, kIova + kCut));
    std::vector<std::byte> table(16 * kSize);
    for (uint16_t i = 0; i < kSize; ++i) {
      VringDesc d{1000U + i, i, 0, 0};
      std::memcpy(table.data() + 16ULL * i, &d, sizeof(d));
    }
    std::memcpy(first.host() + kTable, table.data(), kCut - kTable);
    std::memcpy(second.host_address(), table.data() + (kCut - kTable),
                table.size() - (kCut - kTable));
  }
  [[nodiscard]] Result<std::unique_ptr<VringCache>> cache() const {
    return VringCache::create(ioas, {kIova + kTable, kIova + kAvail, kIova + kUsed, kSize, false});
  }
  RingFile first{2};
  test::Memfd second_fd{kPageSize};
  MemorySource second = MemorySource::from_file(second_fd.fd(), 0, kPageSize).value();
  std::shared_ptr<Ioas> ioas = Ioas::create({}).value();
};

TEST(VringCache, CreateChecksTheLayout) {
  auto ioas = Ioas::create({}).value();
  EXPECT_ERRNO(VringCache::create(nullptr, layout_at(kIova)), EINVAL);
  for (uint16_t bad : {0, 3, 100}) {
    VringLayout l = layout_at(kIova);
    l.size = bad;
    EXPECT_ERRNO(VringCache::create(ioas, l), EINVAL);
  }
  VringLayout l = layout_at(kIova);
  l.desc_iova += 8;
  EXPECT_ERRNO(VringCache::create(ioas, l), EINVAL);
  l = layout_at(kIova);
  l.avail_iova += 1;
  EXPECT_ERRNO(VringCache::create(ioas, l), EINVAL);
  l = layout_at(kIova);
  l.used_iova += 2;
  EXPECT_ERRNO(VringCache::create(ioas, l), EINVAL);
  l = layout_at(kIova);
  l.desc_iova = UINT64_MAX - 15;  // 64 descriptors wrap
  EXPECT_ERRNO(VringCache::create(ioas, l), EINVAL);
  l = layout_at(kIova);
  l.size = 32768;
  EXPECT_OK(VringCache::create(ioas, l));  // unmapped is fine: accesses say ENOENT
}

TEST(VringCache, AccessesGoThroughCachedPointers) {
  RingFile ring(5);
  auto ioas = Ioas::create({}).value();
  ASSERT_OK(ioas->map(ring.source, kRW, kIova));
  auto c = VringCache::create(ioas, layout_at(kIova, true));
  ASSERT_OK(c);
  VringCache& cache = **c;
  EXPECT_TRUE(cache.cached());
  EXPECT_EQ(*cache.avail_flags(), 1);
  EXPECT_EQ(*cache.avail_idx(), kSize);
  EXPECT_EQ(*cache.avail_entry(kSize + 3), 3);  // slot modulo size
  EXPECT_EQ(*cache.used_event(), 7);
  auto d = cache.desc(9);
  ASSERT_OK(d);
  EXPECT_EQ(d->addr, (5ULL << 32) | 9);
  EXPECT_EQ(d->len, 5U);
  EXPECT_EQ(d->next, 10);
  EXPECT_ERRNO(cache.desc(kSize), EINVAL);
  ASSERT_OK(cache.set_used_entry(kSize + 2, 9, 77));
  ASSERT_OK(cache.set_used_idx(3));
  ASSERT_OK(cache.set_used_flags(1));
  ASSERT_OK(cache.set_avail_event(11));
  EXPECT_EQ(*cache.used_idx(), 3);
  const UsedRingView used(ring.host());
  EXPECT_EQ(used.id(2), 9U);
  EXPECT_EQ(used.len(2), 77U);
  EXPECT_EQ(used.idx(), 3);
  EXPECT_EQ(used.avail_event(), 11);
  const VringCacheStats s = cache.stats();
  EXPECT_EQ(s.slow_accesses, 0U);
  EXPECT_EQ(s.cached_batches, 11U);  // one per access
  EXPECT_EQ(s.uncached_batches, 0U);
  EXPECT_EQ(s.revalidations, 1U);
  EXPECT_EQ(s.invalidations, 0U);
  EXPECT_EQ(s.refusals, 0U);
}

TEST(VringCache, BatchAccessesGoThroughCachedPointers) {
  MappedRing mapped(4, /*event_idx=*/true);
  auto& [ring, ioas, cache] = mapped;
  {
    VringCache::Batch b = cache->batch();
    EXPECT_TRUE(b.cached());
    EXPECT_EQ(b.avail_flags(), 1);
    EXPECT_EQ(b.avail_idx(), kSize);
    EXPECT_EQ(b.used_event(), 7);
    for (uint16_t slot = 0; slot < kSize; ++slot) {
      const uint16_t head = b.avail_entry(slot);
      const VringDesc d = b.desc(head);
      EXPECT_EQ(d.addr, (4ULL << 32) | head);
      b.set_used_entry(slot, head, d.len + slot);
    }
    b.set_used_idx(kSize);
    b.set_avail_event(5);
    b.set_used_flags(1);
    EXPECT_EQ(b.used_idx(), kSize);
    EXPECT_OK(b.status());
    // Counted when it opened; its accesses count nothing.
    EXPECT_EQ(cache->stats().cached_batches, 1U);
  }
  const UsedRingView used(ring.host());
  EXPECT_EQ(used.id(63), 63U);
  EXPECT_EQ(used.len(63), 4U + 63U);
  const VringCacheStats s = cache->stats();
  EXPECT_EQ(s.cached_batches, 1U);
  EXPECT_EQ(s.uncached_batches, 0U);
  EXPECT_EQ(s.slow_accesses, 0U);
  EXPECT_EQ(s.revalidations, 1U);

  // Without event_idx the batch refuses those fields.
  auto plain = VringCache::create(ioas, layout_at(kIova, false)).value();
  {
    VringCache::Batch b = plain->batch();
    EXPECT_EQ(b.used_event(), 0);
    EXPECT_ERRNO(b.status(), EINVAL);
  }
  {
    VringCache::Batch b = plain->batch();
    b.set_avail_event(1);
    EXPECT_ERRNO(b.status(), EINVAL);
  }
}

// The first error of a batch sticks: later reads return zero, later
// writes are not performed (nothing more reaches the used ring), and a
// later, different error does not replace it.
TEST(VringCache, BatchErrorSticksAndStopsWrites) {
  MappedRing mapped(3, /*event_idx=*/false);
  auto& [ring, ioas, cache] = mapped;
  {
    VringCache::Batch b = cache->batch();
    ASSERT_TRUE(b.cached());
    EXPECT_EQ(b.avail_idx(), kSize);
    b.set_used_entry(0, 4, 40);
    EXPECT_TRUE(b.ok());
    const VringDesc bad = b.desc(kSize);
    EXPECT_EQ(bad.addr, 0U);
    EXPECT_FALSE(b.ok());
    EXPECT_ERRNO(b.status(), EINVAL);
    const VringDesc after = b.desc(1);  // a good index, read after the error
    EXPECT_EQ(after.addr, 0U);
    EXPECT_EQ(after.len, 0U);
    EXPECT_EQ(b.avail_idx(), 0);
    EXPECT_EQ(b.avail_entry(2), 0);
    b.set_used_entry(1, 5, 50);
    b.set_used_idx(2);
    b.set_used_flags(1);
    b.set_avail_event(3);  // EINVAL of its own (no event_idx): not recorded
    EXPECT_TRUE(b.cached());
    const Status st = b.status();
    EXPECT_EQ(st.code(), EINVAL);
    EXPECT_EQ(st.error().message(), "descriptor index past the queue size");
  }
  const UsedRingView used(ring.host());
  EXPECT_EQ(used.id(0), 4U);  // before the error
  EXPECT_EQ(used.len(0), 40U);
  EXPECT_EQ(used.id(1), 0U);  // after it: not written
  EXPECT_EQ(used.len(1), 0U);
  EXPECT_EQ(used.flags(), 0);
  EXPECT_EQ(used.idx(), 0);
  // The next batch starts clean.
  VringCache::Batch b = cache->batch();
  EXPECT_EQ(b.desc(1).addr, (3ULL << 32) | 1);
  EXPECT_OK(b.status());
}

TEST(VringCache, EventIdxFieldsNeedTheFeature) {
  MappedRing mapped(1, /*event_idx=*/false);
  auto& [ring, ioas, cache] = mapped;
  EXPECT_ERRNO(cache->used_event(), EINVAL);
  EXPECT_ERRNO(cache->set_avail_event(1), EINVAL);
}

// The descriptor table straddles two mappings of different files, which
// meet 8 bytes into descriptor 39 (no domain: byte-granular mappings). Each
// run is cached separately; the descriptor cut by the boundary is copied
// run by run through the cached pointers, in a batch as well as alone.
TEST(VringCache, RingsSpanningMappingsUseEachRun) {
  SplitTable split;
  auto c = split.cache();
  ASSERT_OK(c);
  EXPECT_TRUE((*c)->cached());
  for (uint16_t i = 0; i < kSize; ++i) {
    auto d = (*c)->desc(i);
    ASSERT_OK(d);
    EXPECT_EQ(d->addr, 1000U + i);
    EXPECT_EQ(d->len, i);
  }
  {
    VringCache::Batch b = (*c)->batch();
    EXPECT_TRUE(b.cached());
    for (uint16_t i = 0; i < kSize; ++i) {
      const VringDesc d = b.desc(i);
      EXPECT_EQ(d.addr, 1000U + i);
      EXPECT_EQ(d.len, i);
    }
    EXPECT_OK(b.status());
  }
  EXPECT_EQ((*c)->stats().slow_accesses, 0U);
  EXPECT_EQ((*c)->stats().cached_batches, kSize + 1U);
}

// Which view Batch::run gave its visitor.
template <typename View>
constexpr bool is_direct(const View& /*view*/) {
  return std::is_same_v<View, VringCache::Batch::Direct>;
}

// Over rings that are each one host run, run() gives the visitor a Direct
// view: the same accesses as the batch's, through the cached pointers, and
// what the visitor returns.
TEST(VringCache, BatchRunGivesADirectViewOverSingleRuns) {
  MappedRing mapped(4, /*event_idx=*/true);
  auto& [ring, ioas, cache] = mapped;
  {
    VringCache::Batch b = cache->batch();
    bool direct = false;
    const uint64_t sum = b.run([&](auto& r) {
      direct = is_direct(r);
      EXPECT_TRUE(r.cached());
      EXPECT_EQ(r.avail_flags(), 1);
      EXPECT_EQ(r.used_event(), 7);
      uint64_t total = 0;
      const uint16_t avail = r.avail_idx();
      for (uint16_t slot = 0; slot != avail; ++slot) {
        const uint16_t head = r.avail_entry(slot);
        const VringDesc d = r.desc(head);
        EXPECT_EQ(d.addr, (4ULL << 32) | head);
        EXPECT_EQ(d.next, (head + 1) % kSize);
        total += d.len;
        r.set_used_entry(slot, head, d.len + slot);
      }
      r.set_used_idx(avail);
      r.set_avail_event(5);
      r.set_used_flags(1);
      EXPECT_EQ(r.used_idx(), kSize);
      EXPECT_OK(r.status());
      return total;
    });
    EXPECT_TRUE(direct);
    EXPECT_EQ(sum, 4U * kSize);
    EXPECT_OK(b.status());
  }
  const UsedRingView used(ring.host());
  EXPECT_EQ(used.id(63), 63U);
  EXPECT_EQ(used.len(63), 4U + 63U);
  EXPECT_EQ(used.flags(), 1);
  EXPECT_EQ(used.idx(), kSize);
  EXPECT_EQ(used.avail_event(), 5);
  const VringCacheStats s = cache->stats();
  EXPECT_EQ(s.cached_batches, 1U);
  EXPECT_EQ(s.slow_accesses, 0U);
}

// A Direct view's first error sticks as the batch's does, with no test per
// access: later reads return zero (the dead ring), later writes reach no
// ring (the sink), a later, different error does not replace it, and run()
// records it in the batch, whose own accesses then stop too.
TEST(VringCache, BatchRunDirectErrorSticksAndStopsWrites) {
  MappedRing mapped(3, /*event_idx=*/true);
  auto& [ring, ioas, cache] = mapped;
  {
    VringCache::Batch b = cache->batch();
    bool direct = false;
    b.run([&](auto& r) {
      direct = is_direct(r);
      EXPECT_EQ(r.avail_idx(), kSize);
      r.set_used_entry(0, 4, 40);
      r.set_used_idx(1);
      EXPECT_EQ(r.used_idx(), 1);
      EXPECT_TRUE(r.ok());
      const VringDesc bad = r.desc(kSize);
      EXPECT_EQ(bad.addr, 0U);
      EXPECT_FALSE(r.ok());
      EXPECT_ERRNO(r.status(), EINVAL);
      const VringDesc after = r.desc(1);  // a good index, read after the error
      EXPECT_EQ(after.addr, 0U);
      EXPECT_EQ(after.len, 0U);
      EXPECT_EQ(r.desc(0).addr, 0U);
      EXPECT_EQ(r.avail_idx(), 0);
      EXPECT_EQ(r.avail_flags(), 0);
      EXPECT_EQ(r.avail_entry(2), 0);
      EXPECT_EQ(r.used_event(), 0);
      r.set_used_entry(1, 5, 50);
      r.set_used_entry(0, 6, 60);
      r.set_used_idx(2);
      r.set_used_flags(1);
      r.set_avail_event(3);
      EXPECT_EQ(r.used_idx(), 0);
      EXPECT_EQ(r.avail_idx(), 0);  // the sink is not where reads go
      EXPECT_EQ(r.status().error().message(), "descriptor index past the queue size");
    });
    EXPECT_TRUE(direct);
    EXPECT_FALSE(b.ok());
    b.set_used_idx(3);
    EXPECT_EQ(b.desc(1).addr, 0U);
    // A pass over a failed batch gets the batch, which stops every access.
    b.run([&](auto& r) {
      EXPECT_FALSE(is_direct(r));
      r.set_used_entry(2, 7, 70);
    });
    const Status st = b.status();
    EXPECT_EQ(st.code(), EINVAL);
    EXPECT_EQ(st.error().message(), "descriptor index past the queue size");
  }
  const UsedRingView used(ring.host());
  EXPECT_EQ(used.id(0), 4U);  // before the error
  EXPECT_EQ(used.len(0), 40U);
  for (uint16_t slot = 1; slot < 3; ++slot) {  // after it: not written
    EXPECT_EQ(used.id(slot), 0U) << slot;
    EXPECT_EQ(used.len(slot), 0U) << slot;
  }
  EXPECT_EQ(used.flags(), 0);
  EXPECT_EQ(used.idx(), 1);  // before the error
  EXPECT_EQ(used.avail_event(), 0);
  // The dead ring read by failed views is still all zeros.
  for (std::byte x : vring::kDeadRing) EXPECT_EQ(x, std::byte{0});
  // The next batch starts clean, with a Direct view again.
  VringCache::Batch b = cache->batch();
  b.run([&](auto& r) {
    EXPECT_TRUE(is_direct(r));
    EXPECT_EQ(r.desc(1).addr, (3ULL << 32) | 1);
    EXPECT_EQ(r.used_idx(), 1);
  });
  EXPECT_OK(b.status());
}

// Without event_idx a Direct view refuses those fields with the batch's
// error, which sticks.
TEST(VringCache, BatchRunDirectEventIdxFieldsNeedTheFeature) {
  MappedRing mapped(1, /*event_idx=*/false);
  auto& [ring, ioas, cache] = mapped;
  for (const bool write : {false, true}) {
    VringCache::Batch b = cache->batch();
    b.run([&](auto& r) {
      EXPECT_TRUE(is_direct(r));
      if (write) {
        r.set_avail_event(1);
      } else {
        EXPECT_EQ(r.used_event(), 0);
      }
      EXPECT_EQ(r.desc(1).len, 0U);
      r.set_used_idx(4);
    });
    const Status st = b.status();
    EXPECT_EQ(st.code(), EINVAL);
    EXPECT_EQ(st.error().message(), "VIRTIO_RING_F_EVENT_IDX not negotiated");
  }
  EXPECT_EQ(UsedRingView(ring.host()).idx(), 0);
}

// run() gives the batch itself where a ring is not one host run (a table
// over two mappings) or the batch holds no cached pointers (unmapped): the
// same visitor, with the batch's tests per access.
TEST(VringCache, BatchRunGivesTheBatchOtherwise) {
  SplitTable split;
  auto c = split.cache();
  ASSERT_OK(c);
  auto pass = [](auto& r) {
    uint64_t sum = 0;
    for (uint16_t i = 0; i < kSize; ++i) {
      const VringDesc d = r.desc(i);
      EXPECT_EQ(d.addr, 1000U + i);
      sum += d.len;
    }
    return std::pair{is_direct(r), sum};
  };
  {
    VringCache::Batch b = (*c)->batch();
    EXPECT_TRUE(b.cached());
    EXPECT_EQ(b.run(pass), std::pair(false, uint64_t{kSize * (kSize - 1) / 2}));
    EXPECT_OK(b.status());
  }
  EXPECT_EQ((*c)->stats().slow_accesses, 0U);

  ASSERT_OK(split.ioas->unmap(kIova, kRingBytes - 8));
  VringCache::Batch b = (*c)->batch();
  EXPECT_FALSE(b.cached());
  b.run([](auto& r) {
    EXPECT_FALSE(is_direct(r));
    EXPECT_EQ(r.desc(1).len, 0U);
  });
  EXPECT_ERRNO(b.status(), ENOENT);
}

TEST(VringCache, UnmapFallsBackAndANewMappingRevalidates) {
  TwoRings t;
  auto& [first, second, ioas, cache] = t;
  ASSERT_TRUE(cache->cached());
  EXPECT_EQ(cache->desc(1)->len, 1U);
  ASSERT_OK(ioas->unmap(kIova, kRingBytes));
  EXPECT_FALSE(cache->cached());
  EXPECT_GE(cache->stats().invalidations, 1U);
  EXPECT_ERRNO(cache->desc(1), ENOENT);
  EXPECT_ERRNO(cache->set_used_idx(1), ENOENT);
  ASSERT_OK(ioas->map(second.source, kRW, kIova));
  auto d = cache->desc(1);
  ASSERT_OK(d);
  EXPECT_EQ(d->len, 2U);  // the new mapping, never the old one
  EXPECT_TRUE(cache->cached());
  EXPECT_EQ(cache->stats().revalidations, 2U);
}

// A batch opened while the rings are unmapped copies, through the mapping
// of the moment: its first access fails (ENOENT), and that error sticks
// even once the rings are back (nothing more is read or written); a batch
// opened before they come back copies from the new mapping; the next batch
// re-validates and holds cached pointers.
TEST(VringCache, BatchFallsBackToCopiesAndTheNextRevalidates) {
  TwoRings t;
  auto& [first, second, ioas, cache] = t;
  ASSERT_OK(ioas->unmap(kIova, kRingBytes));
  {
    VringCache::Batch b = cache->batch();
    EXPECT_FALSE(b.cached());
    EXPECT_EQ(b.desc(1).len, 0U);
    EXPECT_ERRNO(b.status(), ENOENT);
    ASSERT_OK(ioas->map(second.source, kRW, kIova));
    EXPECT_EQ(b.desc(1).len, 0U);
    b.set_used_idx(9);
    EXPECT_ERRNO(b.status(), ENOENT);
  }
  EXPECT_EQ(UsedRingView(second.host()).idx(), 0);  // the failed batch wrote nothing
  EXPECT_EQ(cache->stats().slow_accesses, 0U);
  ASSERT_OK(ioas->unmap(kIova, kRingBytes));
  {
    VringCache::Batch b = cache->batch();
    ASSERT_OK(ioas->map(second.source, kRW, kIova));
    EXPECT_EQ(b.desc(1).len, 2U);
    b.set_used_idx(9);
    EXPECT_OK(b.status());
    EXPECT_FALSE(b.cached());
  }
  VringCacheStats s = cache->stats();
  EXPECT_EQ(s.slow_accesses, 2U);
  EXPECT_EQ(s.uncached_batches, 2U);
  EXPECT_EQ(s.cached_batches, 0U);
  VringCache::Batch b = cache->batch();
  EXPECT_TRUE(b.cached());
  EXPECT_EQ(b.desc(1).len, 2U);
  EXPECT_EQ(b.used_idx(), 9);
  EXPECT_OK(b.status());
  s = cache->stats();
  EXPECT_EQ(s.revalidations, 2U);
  EXPECT_EQ(s.cached_batches, 1U);
}

// A batch holding cached pointers holds an unmap off: the cache's three
// non-blocking callbacks refuse, the blocking retries wait, and until the
// batch closes it (and the cache's own accessors, nested in it) read and
// write the memory mapped when it opened. The unmap then completes; the
// next batch sees the new mapping.
TEST(VringCache, InvalidationIsSeenBetweenBatchesOnly) {
  TwoRings t;
  auto& [first, second, ioas, cache] = t;
  std::atomic<bool> replaced{false};
  std::thread mapper;
  {
    VringCache::Batch b = cache->batch();
    ASSERT_TRUE(b.cached());
    EXPECT_EQ(b.desc(5).len, 1U);
    mapper = std::thread([&] {
      EXPECT_OK(ioas->unmap(kIova, kRingBytes));
      EXPECT_OK(ioas->map(second.source, kRW, kIova));
      replaced = true;
    });
    while (cache->stats().refusals < 3) std::this_thread::yield();
    EXPECT_FALSE(cache->cached());  // the next batch will not use these pointers
    EXPECT_EQ(cache->stats().invalidations, 0U);
    EXPECT_EQ(b.desc(5).len, 1U);
    EXPECT_EQ(cache->desc(6)->len, 1U);  // nested: the batch's pointers
    b.set_used_entry(0, 5, 77);
    b.set_used_idx(1);
    EXPECT_OK(b.status());
    EXPECT_FALSE(replaced.load());
  }
  mapper.join();
  ASSERT_TRUE(replaced.load());
  const UsedRingView used(first.host());
  EXPECT_EQ(used.id(0), 5U);
  EXPECT_EQ(used.len(0), 77U);
  VringCacheStats s = cache->stats();
  EXPECT_EQ(s.refusals, 3U);
  EXPECT_EQ(s.invalidations, 3U);
  EXPECT_EQ(s.slow_accesses, 0U);
  VringCache::Batch b = cache->batch();
  EXPECT_TRUE(b.cached());
  EXPECT_EQ(b.desc(5).len, 2U);
  EXPECT_EQ(b.used_idx(), 0);  // the second file's used ring
  EXPECT_OK(b.status());
  s = cache->stats();
  EXPECT_EQ(s.revalidations, 2U);
}

TEST(VringCache, ReadOnlyUsedRingIsEperm) {
  RingFile ring(1);
  auto ioas = Ioas::create({}).value();
  ASSERT_OK(ioas->map(ring.source, kProtRead, kIova));
  auto cache = VringCache::create(ioas, layout_at(kIova)).value();
  EXPECT_FALSE(cache->cached());
  EXPECT_EQ(cache->desc(4)->addr, (1ULL << 32) | 4);  // reads are copied
  EXPECT_ERRNO(cache->set_used_idx(1), EPERM);
  // In a batch: the failed write's EPERM sticks, and the reads after it
  // return zero.
  VringCache::Batch b = cache->batch();
  EXPECT_EQ(b.desc(4).addr, (1ULL << 32) | 4);
  b.set_used_entry(0, 4, 1);
  EXPECT_EQ(b.desc(4).addr, 0U);
  EXPECT_ERRNO(b.status(), EPERM);
}

// User memory is never reached through a cached pointer: every access is a
// guarded copy, and one into memory the caller unmapped is EFAULT.
TEST(VringCache, UserMemoryIsCopiedNeverCached) {
  void* mem = mmap(nullptr, kRingBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(mem, MAP_FAILED);
  fill_ring(static_cast<std::byte*>(mem), 3);
  auto ioas = Ioas::create({}).value();
  ASSERT_OK(ioas->map(*MemorySource::from_user(mem, kRingBytes), kRW, kIova));
  auto cache = VringCache::create(ioas, layout_at(kIova)).value();
  EXPECT_FALSE(cache->cached());
  EXPECT_EQ(cache->desc(2)->addr, (3ULL << 32) | 2);
  ASSERT_OK(cache->set_used_entry(0, 2, 9));
  EXPECT_EQ(UsedRingView(mem).id(0), 2U);
  EXPECT_EQ(cache->stats().cached_batches, 0U);
  EXPECT_EQ(cache->stats().uncached_batches, 2U);
  EXPECT_EQ(cache->stats().slow_accesses, 2U);
  ASSERT_EQ(munmap(mem, kRingBytes), 0);
  EXPECT_ERRNO(cache->desc(2), EFAULT);
  ASSERT_OK(ioas->unmap_all());
}

// An access in progress holds off the invalidation: the ring is user memory
// whose pages are missing behind a userfaultfd, so the data path's copy
// blocks inside the access. An unmap then finds the access running: the
// cache's non-blocking callback refuses (a later notifier of the same
// batch sees that first pass), the blocking retry waits until the copy
// ends, and the copy, which raced, is EFAULT.
TEST(VringCache, InvalidationWaitsForAnAccessInProgress) {
  test::UserfaultRegion region(kRingBytes);
  IOMM_NEEDS(region.ok(), "userfaultfd handling kernel faults (vm.unprivileged_userfaultfd=1)");
  auto ioas = Ioas::create({}).value();
  ASSERT_OK(ioas->map(*MemorySource::from_user(region.addr(), kRingBytes), kRW, kIova));
  auto cache = VringCache::create(ioas, layout_at(kIova)).value();
  std::atomic<bool> first_pass_done{false};
  auto later =
      IntervalNotifier::watch_iova(ioas, {kIova, kIova + kRingBytes - 1},
                                   [&](IntervalNotifier& n, const Invalidation& inv, uint64_t seq) {
                                     n.set_seq(seq);
                                     if (!inv.blocking) first_pass_done = true;
                                     return true;
                                   });
  ASSERT_OK(later);
  std::atomic<int> access_code{-1};
  std::thread data_path([&] { access_code = cache->desc(0).code(); });
  ASSERT_TRUE(region.wait_fault(10000));  // the copy is blocked inside the access
  std::atomic<bool> unmapped{false};
  std::thread unmapper([&] {
    EXPECT_OK(ioas->unmap(kIova, kRingBytes));
    unmapped = true;
  });
  while (!first_pass_done.load()) std::this_thread::yield();
  EXPECT_FALSE(unmapped.load());
  EXPECT_EQ(access_code.load(), -1);
  region.resolve_all();
  data_path.join();
  unmapper.join();
  EXPECT_EQ(access_code.load(), EFAULT);
  EXPECT_GE(cache->stats().invalidations, 3U);
}

// One thread processes the ring in a loop while another unmaps it and maps
// another generation's file at the same IOVA, over and over. Each
// generation's ring has its own contents; the mapper publishes which
// generation is mapped (odd while it is changing), and once an unmap has
// returned it poisons the file it unmapped (and restores it before mapping
// it again). The checks: no access ever reads poison (through a stale
// pointer or a stale copy; TSan would also see the poisoning race with it);
// every access that succeeded while one generation stayed mapped read that
// generation; and, in batches, every access of a batch holding cached
// pointers read one and the same generation.
constexpr uint32_t kPoison = 0xbad;

enum class Mode { kAccesses, kBatches, kRunBatches };

void stress(Mode mode) {
  constexpr int kGenerations = 4;
  constexpr int kPerBatch = 16;
  std::vector<std::unique_ptr<RingFile>> files;
  for (uint32_t g = 0; g < kGenerations; ++g) files.push_back(std::make_unique<RingFile>(g + 1));
  auto ioas = Ioas::create({}).value();
  ASSERT_OK(ioas->map(files[0]->source, kRW, kIova));
  auto cache = VringCache::create(ioas, layout_at(kIova)).value();
  // state = 2 * (index of the mapped generation) + (1 while changing)
  std::atomic<uint64_t> state{0};
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> checked{0};
  std::atomic<uint64_t> held_batches{0};
  std::atomic<uint64_t> stale{0};
  std::atomic<uint64_t> direct_passes{0};
  std::thread data_path([&] {
    uint16_t slot = 0;
    std::vector<uint32_t> lens;
    while (!stop.load(std::memory_order_relaxed)) {
      const uint64_t before = state.load(std::memory_order_acquire);
      lens.clear();
      auto check = [&](const VringDesc& d) {
        if (d.len == kPoison || (d.addr >> 32) != d.len) stale.fetch_add(1);
        lens.push_back(d.len);
      };
      if (mode != Mode::kAccesses) {
        VringCache::Batch b = cache->batch();
        auto pass = [&](auto& r) {
          for (int k = 0; k < kPerBatch; ++k, ++slot) {
            const uint16_t head = r.avail_entry(slot);
            const VringDesc d = r.desc(head);
            r.set_used_entry(slot, head, d.len);
            if (!r.ok()) break;  // what it read is meaningless
            check(d);
          }
          if (is_direct(r)) direct_passes.fetch_add(1, std::memory_order_relaxed);
        };
        if (mode == Mode::kRunBatches) {
          b.run(pass);
        } else {
          pass(b);
        }
        if (b.cached()) {
          held_batches.fetch_add(1, std::memory_order_relaxed);
          for (uint32_t len : lens) {
            if (len != lens.front()) stale.fetch_add(1);
          }
        }
      } else {
        auto head = cache->avail_entry(slot);
        auto d = head ? cache->desc(*head) : Result<VringDesc>(head.error());
        if (d) {
          (void)cache->set_used_entry(slot, *head, d->len);
          check(*d);
        }
        ++slot;
      }
      const uint64_t after = state.load(std::memory_order_acquire);
      if (lens.empty() || (before & 1) != 0 || before != after) continue;
      const uint32_t gen = static_cast<uint32_t>(before / 2) % kGenerations + 1;
      for (uint32_t len : lens) {
        if (len != gen) stale.fetch_add(1);
      }
      checked.fetch_add(1, std::memory_order_relaxed);
    }
  });
  constexpr int kSwaps = 400;
  for (int i = 1; i <= kSwaps; ++i) {
    state.fetch_add(1, std::memory_order_acq_rel);  // odd: changing
    ASSERT_OK(ioas->unmap(kIova, kRingBytes));
    // Nothing may read the unmapped file any more.
    fill_ring(files[(i - 1) % kGenerations]->host(), kPoison);
    RingFile& next = *files[i % kGenerations];
    fill_ring(next.host(), i % kGenerations + 1);
    ASSERT_OK(ioas->map(next.source, kRW, kIova));
    state.fetch_add(1, std::memory_order_acq_rel);  // even: generation i
    // Let the data path run on the new mapping now and then.
    if (i % 16 == 0) {
      const uint64_t seen = checked.load();
      while (checked.load() == seen) std::this_thread::yield();
    }
  }
  stop = true;
  data_path.join();
  EXPECT_EQ(stale.load(), 0U);
  EXPECT_GT(checked.load(), 0U);
  if (mode != Mode::kAccesses) {
    EXPECT_GT(held_batches.load(), 0U);
  }
  // Batch::run over rings that are each one host run: Direct views.
  if (mode == Mode::kRunBatches) {
    EXPECT_GT(direct_passes.load(), 0U);
  } else {
    EXPECT_EQ(direct_passes.load(), 0U);
  }
  const VringCacheStats s = cache->stats();
  EXPECT_GE(s.invalidations, static_cast<uint64_t>(kSwaps));
  EXPECT_GT(s.revalidations, 1U);
  ::testing::Test::RecordProperty("cached_batches", std::to_string(s.cached_batches));
  ::testing::Test::RecordProperty("uncached_batches", std::to_string(s.uncached_batches));
  ::testing::Test::RecordProperty("slow", std::to_string(s.slow_accesses));
  ::testing::Test::RecordProperty("refusals", std::to_string(s.refusals));
}

TEST(VringCache, StressNoAccessUsesAStalePointer) { stress(Mode::kAccesses); }

TEST(VringCache, StressNoBatchUsesAStalePointer) { stress(Mode::kBatches); }

TEST(VringCache, StressNoDirectPassUsesAStalePointer) { stress(Mode::kRunBatches); }

}  // namespace
}  // namespace iomm
