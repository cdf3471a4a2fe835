#include "iomm/vring_cache.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "core/check.hpp"
#include "iomm/ioas.hpp"
#include "iomm/notifier.hpp"
#include "iomm/range.hpp"
#include "mem/checked_copy.hpp"
#include "mem/safe_copy.hpp"
#include "monitor/process_monitor.hpp"
#include "sync/membarrier.hpp"
#include "sync/ranked_mutex.hpp"

// The rings are little-endian (virtio 1.x); the fields are read in place.
static_assert(std::endian::native == std::endian::little);

namespace iomm {

namespace vring {

namespace {

struct Segment {
  uint64_t offset;  // from the ring's start
  uint64_t length;
  std::byte* host;
};

struct Ring {
  uint64_t iova = 0;
  uint64_t bytes = 0;
  uint32_t prot = 0;
  // Data path only: filled by revalidation (with no batch holding them),
  // read by batches.
  std::vector<Segment> segments;
  std::byte* whole = nullptr;  // the ring in one run (the common case)
  std::unique_ptr<IntervalNotifier> notifier;
};

// The errors of the contract, fixed (a batch records a pointer to one).
constexpr Failure kNotMapped{ENOENT, "part of the ring is not mapped in the Ioas"};
constexpr Failure kNoPermission{EPERM,
                                "the ring is mapped without the permission the access needs"};
constexpr Failure kUnreachable{EFAULT, "the ring's memory cannot be reached"};
constexpr Failure kGone{EFAULT, "the ring's memory is gone"};
constexpr Failure kRaced{EFAULT, "the ring was invalidated during the access"};
constexpr Failure kMonitorThread{EDEADLK,
                                 "a ring copy on the memory monitor's thread cannot wait for its "
                                 "events"};

// What a failed translation means for the ring: what is not ENOENT or
// EPERM means the memory cannot be reached (live update, simulated
// memory): EFAULT.
const Failure* translation_failure(int code) noexcept {
  if (code == ENOENT) return &kNotMapped;
  if (code == EPERM) return &kNoPermission;
  return &kUnreachable;
}

// How long a blocking callback yields before it sleeps, how long it sleeps
// between looks, and how long a batch may hold it off before the caller is
// declared broken (a batch is one pass over the ring with no blocking wait
// in it: microseconds).
constexpr int kYieldSpins = 100;
constexpr auto kHoldPoll = std::chrono::microseconds(100);
constexpr auto kHoldLimit = std::chrono::seconds(10);

}  // namespace

struct CacheState {
  std::shared_ptr<Ioas> ioas;
  VringLayout layout;
  uint16_t mask = 0;
  bool asymmetric = false;  // membarrier pairs with a compiler barrier

  // The handshake with the callbacks (Dekker): the data path raises `hold`
  // (the depth of open batches holding the pointers, and of guarded copies
  // in progress), fences, then reads `valid`; a callback clears `valid`
  // (and stamps the notifier), fences, then reads `hold`. One of them sees
  // the other. Only the data-path thread writes `hold`.
  std::atomic<uint32_t> hold{0};
  std::atomic<bool> valid{false};
  // Orders a revalidation's read_retry and publication against the
  // callbacks' set_seq.
  sync::RankedMutex mu{sync::LockRank::vring_cache, "VringCache mu"};

  std::atomic<uint64_t> cached_batches{0};
  std::atomic<uint64_t> uncached_batches{0};
  std::atomic<uint64_t> slow_count{0};
  std::atomic<uint64_t> invalidations{0};
  std::atomic<uint64_t> revalidations{0};
  std::atomic<uint64_t> refusals{0};

  std::array<Ring, 3> rings;
  // Data path only: the rings were found in memory that cannot be cached,
  // at these sequences.
  bool uncacheable = false;
  std::array<uint64_t, 3> uncacheable_seqs{};

  static void add(std::atomic<uint64_t>& c, uint64_t n) noexcept {
    // One writer (the data path): no locked add.
    c.store(c.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
  }

  void enter() noexcept {
    hold.store(hold.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    sync::light_fence(asymmetric);
  }
  void leave() noexcept {
    hold.store(hold.load(std::memory_order_relaxed) - 1, std::memory_order_release);
  }

  bool invalidate(IntervalNotifier& n, const Invalidation& inv, uint64_t seq) {
    std::unique_lock lk(mu, std::try_to_lock);
    if (!lk.owns_lock()) {
      // A revalidation holds it for a few loads; only a blocking callback
      // may wait.
      if (!inv.blocking) return false;
      lk.lock();
    }
    n.set_seq(seq);
    valid.store(false, std::memory_order_relaxed);
    lk.unlock();
    sync::heavy_fence(asymmetric);
    if (hold.load(std::memory_order_acquire) != 0) {
      if (!inv.blocking) {
        refusals.fetch_add(1, std::memory_order_relaxed);
        return false;
      }
      wait_for_release();
    }
    invalidations.fetch_add(1, std::memory_order_relaxed);
    return true;
  }

  // Blocking mode: until the batch (or guarded copy) in progress ends. It
  // takes no lock and waits for nothing, by the contract, so this ends
  // unless the caller broke it, which is reported rather than hung on.
  void wait_for_release() const {
    const auto deadline = std::chrono::steady_clock::now() + kHoldLimit;
    for (int spins = 0; hold.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < kYieldSpins) {
        std::this_thread::yield();
        continue;
      }
      IOMM_CHECK(std::chrono::steady_clock::now() < deadline,
                 "a VringCache batch held an invalidation off for 10 s (a batch must not be "
                 "held across a blocking wait)");
      std::this_thread::sleep_for(kHoldPoll);
    }
  }

  // Look the rings up again under the read_begin / read_retry protocol.
  // Only with no batch holding the pointers (read_begin waits for an
  // invalidation, which may be waiting for that batch).
  bool revalidate() {
    // Rings in memory that cannot be cached stay so until their mapping
    // changes, which invalidates: until then, do not look again.
    if (uncacheable && !changed_since(uncacheable_seqs)) return false;
    std::array<uint64_t, 3> seqs{};
    for (size_t r = 0; r < rings.size(); ++r) seqs[r] = rings[r].notifier->read_begin();
    std::array<std::vector<Segment>, 3> found;
    try {
      for (size_t r = 0; r < rings.size(); ++r) {
        auto segs = ioas->host_segments(rings[r].iova, rings[r].bytes, rings[r].prot);
        if (!segs.ok()) return false;
        for (const auto& s : *segs) {
          // User memory and files that may shrink are copied with guarded
          // copies only.
          if (!s.library_mapped) {
            uncacheable = true;
            uncacheable_seqs = seqs;
            return false;
          }
          found[r].push_back({s.iova - rings[r].iova, s.length, static_cast<std::byte*>(s.host)});
        }
      }
    } catch (const std::bad_alloc&) {
      return false;  // stays on guarded copies
    }
    uncacheable = false;
    std::lock_guard lk(mu);
    if (changed_since(seqs)) return false;
    for (size_t r = 0; r < rings.size(); ++r) {
      rings[r].segments = std::move(found[r]);
      rings[r].whole = rings[r].segments.size() == 1 ? rings[r].segments[0].host : nullptr;
    }
    valid.store(true, std::memory_order_release);
    add(revalidations, 1);
    return true;
  }

  [[nodiscard]] bool changed_since(const std::array<uint64_t, 3>& seqs) const noexcept {
    for (size_t r = 0; r < rings.size(); ++r) {
      if (rings[r].notifier->read_retry(seqs[r])) return true;
    }
    return false;
  }

  BatchView open() {
    BatchView v;
    v.mask = mask;
    v.size = layout.size;
    v.event_idx = layout.event_idx;
    const uint32_t depth = hold.load(std::memory_order_relaxed);
    if (depth != 0) {
      // Nested in a batch of this thread that holds the pointers: they stay
      // valid until that one closes, whatever `valid` says now.
      hold.store(depth + 1, std::memory_order_relaxed);
    } else {
      if (!valid.load(std::memory_order_relaxed) && !revalidate()) {
        add(uncached_batches, 1);
        return v;
      }
      enter();
      if (!valid.load(std::memory_order_acquire)) {
        leave();
        add(uncached_batches, 1);
        return v;
      }
    }
    add(cached_batches, 1);
    v.held = true;
    for (size_t r = 0; r < rings.size(); ++r) v.base[r] = rings[r].whole;
    return v;
  }

  // Whether an out-of-line access may use the cached segments: its batch
  // holds them, or an outer batch of this thread does.
  [[nodiscard]] bool use_cached(bool held) const noexcept {
    return held || hold.load(std::memory_order_relaxed) != 0;
  }

  // Where `n` bytes at `offset` of the ring live, if in one run.
  [[nodiscard]] std::byte* locate(RingId r, uint64_t offset, uint64_t n) const noexcept {
    const Ring& ring = rings[r];
    if (ring.whole != nullptr) return ring.whole + offset;
    for (const Segment& s : ring.segments) {
      if (offset >= s.offset && offset - s.offset < s.length) {
        return offset - s.offset + n <= s.length ? s.host + (offset - s.offset) : nullptr;
      }
    }
    return nullptr;
  }

  // A field cut by the boundary of two runs, copied run by run through the
  // cached pointers (held: the runs are all library-mapped and valid).
  void cut_copy(RingId r, uint64_t offset, void* buf, uint64_t n, bool write) const noexcept {
    auto* cursor = static_cast<std::byte*>(buf);
    for (const Segment& s : rings[r].segments) {
      if (n == 0) break;
      if (offset >= s.offset + s.length) continue;
      const uint64_t in = offset - s.offset;
      const uint64_t len = std::min(n, s.length - in);
      if (write) {
        std::memcpy(s.host + in, cursor, len);
      } else {
        std::memcpy(cursor, s.host + in, len);
      }
      cursor += len;
      offset += len;
      n -= len;
    }
  }

  // A translated, guarded copy of one field. It raises `hold` too, so a
  // blocking callback waits for it and a copy that started after an
  // invalidation began sees the new sequence and touches nothing; after
  // it, for user memory, the monitor's pending events are settled and the
  // sequence checked again: a copy that raced is EFAULT.
  const Failure* slow(RingId r, uint64_t offset, void* buf, size_t n, bool write) {
    Ring& ring = rings[r];
    const uint64_t seq = ring.notifier->read_begin();
    auto segs = ioas->host_segments(ring.iova + offset, n, write ? kProtWrite : kProtRead);
    if (!segs.ok()) return translation_failure(segs.code());
    bool copied = true;
    bool user = false;
    enter();
    if (ring.notifier->read_retry(seq)) {
      leave();
      return &kRaced;
    }
    auto* cursor = static_cast<std::byte*>(buf);
    for (const auto& s : *segs) {
      const auto len = static_cast<size_t>(s.length);
      if (s.library_mapped) {
        copied = write ? mem::safe_copy(s.host, cursor, len) : mem::safe_copy(cursor, s.host, len);
      } else {
        user = true;
        const auto addr = reinterpret_cast<uint64_t>(s.host);
        copied =
            write ? mem::checked_write(addr, cursor, len) : mem::checked_read(cursor, addr, len);
      }
      if (!copied) break;
      cursor += len;
    }
    leave();
    if (user && !monitor::settle_user_copies().ok()) return &kMonitorThread;
    if (!copied) return &kGone;
    if (ring.notifier->read_retry(seq)) return &kRaced;
    add(slow_count, 1);
    return nullptr;
  }
};

}  // namespace vring

using vring::CacheState;
using vring::Failure;
using vring::kAvailRing;
using vring::kDescRing;
using vring::kUsedRing;
using vring::RingId;

Result<std::unique_ptr<VringCache>> VringCache::create(const std::shared_ptr<Ioas>& ioas,
                                                       const VringLayout& layout) {
  if (!ioas) return Error(EINVAL, "no Ioas");
  const uint32_t size = layout.size;
  if (size == 0 || size > 32768 || !std::has_single_bit(size)) {
    return Error(EINVAL, "the queue size must be a power of two in [1, 32768]");
  }
  if (!is_aligned(layout.desc_iova, 16) || !is_aligned(layout.avail_iova, 2) ||
      !is_aligned(layout.used_iova, 4)) {
    return Error(EINVAL, "misaligned ring (descriptors 16, available ring 2, used ring 4)");
  }
  const uint64_t event = layout.event_idx ? 2 : 0;
  const std::array<uint64_t, 3> bytes{vring::kDescBytes * size,
                                      vring::kRingHeader + 2ULL * size + event,
                                      vring::kRingHeader + vring::kUsedElemBytes * size + event};
  const std::array<uint64_t, 3> iovas{layout.desc_iova, layout.avail_iova, layout.used_iova};
  const std::array<uint32_t, 3> prots{kProtRead, kProtRead, kProtRead | kProtWrite};
  std::unique_ptr<CacheState> state;
  try {
    state = std::make_unique<CacheState>();
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory");
  }
  state->ioas = ioas;
  state->layout = layout;
  state->mask = static_cast<uint16_t>(size - 1);
  state->asymmetric = sync::membarrier_available();
  CacheState* raw = state.get();
  for (size_t r = 0; r < 3; ++r) {
    const auto range = make_range(iovas[r], bytes[r]);
    if (!range) return Error(EINVAL, "a ring wraps past the top of the IOVA space");
    auto& ring = state->rings[r];
    ring.iova = iovas[r];
    ring.bytes = bytes[r];
    ring.prot = prots[r];
    auto n = IntervalNotifier::watch_iova(
        ioas, *range, [raw](IntervalNotifier& notifier, const Invalidation& inv, uint64_t seq) {
          return raw->invalidate(notifier, inv, seq);
        });
    if (!n.ok()) return std::move(n).error();
    ring.notifier = std::move(n).value();
  }
  // Not mapped yet is fine: accesses report ENOENT until it is.
  state->revalidate();
  try {
    return std::unique_ptr<VringCache>(new VringCache(std::move(state)));
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory");
  }
}

VringCache::VringCache(std::unique_ptr<vring::CacheState> state) : state_(std::move(state)) {}

VringCache::~VringCache() {
  // The notifiers first: their destruction waits for a running callback,
  // which uses the state.
  for (auto& ring : state_->rings) ring.notifier.reset();
}

// A one-access batch: its value, or its error.
namespace {
template <typename Access>
auto one_access(VringCache::Batch&& b, Access access) -> Result<decltype(access(b))> {
  auto v = access(b);
  if (!b.ok()) return b.status().error();
  return v;
}
}  // namespace

Result<uint16_t> VringCache::avail_flags() {
  return one_access(Batch(*this), [](Batch& b) { return b.avail_flags(); });
}
Result<uint16_t> VringCache::avail_idx() {
  return one_access(Batch(*this), [](Batch& b) { return b.avail_idx(); });
}
Result<uint16_t> VringCache::avail_entry(uint16_t slot) {
  return one_access(Batch(*this), [slot](Batch& b) { return b.avail_entry(slot); });
}
Result<uint16_t> VringCache::used_event() {
  return one_access(Batch(*this), [](Batch& b) { return b.used_event(); });
}
Result<VringDesc> VringCache::desc(uint16_t index) {
  return one_access(Batch(*this), [index](Batch& b) { return b.desc(index); });
}
Result<uint16_t> VringCache::used_idx() {
  return one_access(Batch(*this), [](Batch& b) { return b.used_idx(); });
}
Status VringCache::set_used_entry(uint16_t slot, uint32_t id, uint32_t len) {
  Batch b(*this);
  b.set_used_entry(slot, id, len);
  return b.status();
}
Status VringCache::set_used_idx(uint16_t idx) {
  Batch b(*this);
  b.set_used_idx(idx);
  return b.status();
}
Status VringCache::set_used_flags(uint16_t flags) {
  Batch b(*this);
  b.set_used_flags(flags);
  return b.status();
}
Status VringCache::set_avail_event(uint16_t idx) {
  Batch b(*this);
  b.set_avail_event(idx);
  return b.status();
}

const VringLayout& VringCache::layout() const noexcept { return state_->layout; }

bool VringCache::cached() const noexcept { return state_->valid.load(std::memory_order_relaxed); }

VringCacheStats VringCache::stats() const noexcept {
  const auto& s = *state_;
  return {s.cached_batches.load(std::memory_order_relaxed),
          s.uncached_batches.load(std::memory_order_relaxed),
          s.slow_count.load(std::memory_order_relaxed),
          s.invalidations.load(std::memory_order_relaxed),
          s.revalidations.load(std::memory_order_relaxed),
          s.refusals.load(std::memory_order_relaxed)};
}

vring::BatchView VringCache::Batch::open(CacheState& state) { return state.open(); }

void VringCache::Batch::close(CacheState& state, bool held) noexcept {
  if (held) state.leave();
}

// The out-of-line accesses: a held batch over a ring of several runs
// (the field through its run's pointer, or run by run when a boundary cuts
// it), else a guarded copy.

const Failure* VringCache::Batch::load16_out_of_line(CacheState& s, bool held, RingId ring,
                                                     uint64_t offset, bool acquire, uint16_t& out) {
  uint16_t v = 0;
  if (s.use_cached(held)) {
    if (const std::byte* p = s.locate(ring, offset, sizeof(v)); p != nullptr) {
      out = acquire ? __atomic_load_n(reinterpret_cast<const uint16_t*>(p), __ATOMIC_ACQUIRE)
                    : __atomic_load_n(reinterpret_cast<const uint16_t*>(p), __ATOMIC_RELAXED);
      return nullptr;
    }
    s.cut_copy(ring, offset, &v, sizeof(v), false);
  } else if (const Failure* f = s.slow(ring, offset, &v, sizeof(v), false); f != nullptr) {
    return f;
  }
  if (acquire) std::atomic_thread_fence(std::memory_order_acquire);
  out = v;
  return nullptr;
}

const Failure* VringCache::Batch::store16_out_of_line(CacheState& s, bool held, RingId ring,
                                                      uint64_t offset, uint16_t v, bool release) {
  if (release) std::atomic_thread_fence(std::memory_order_release);
  if (!s.use_cached(held)) return s.slow(ring, offset, &v, sizeof(v), true);
  if (std::byte* p = s.locate(ring, offset, sizeof(v)); p != nullptr) {
    __atomic_store_n(reinterpret_cast<uint16_t*>(p), v, __ATOMIC_RELAXED);
  } else {
    s.cut_copy(ring, offset, &v, sizeof(v), true);
  }
  return nullptr;
}

const Failure* VringCache::Batch::desc_out_of_line(CacheState& s, bool held, uint64_t offset,
                                                   VringDesc& out) {
  std::array<std::byte, vring::kDescBytes> raw{};
  if (s.use_cached(held)) {
    if (const std::byte* p = s.locate(kDescRing, offset, raw.size()); p != nullptr) {
      out.addr = __atomic_load_n(reinterpret_cast<const uint64_t*>(p), __ATOMIC_RELAXED);
      out.len = __atomic_load_n(reinterpret_cast<const uint32_t*>(p + 8), __ATOMIC_RELAXED);
      out.flags = __atomic_load_n(reinterpret_cast<const uint16_t*>(p + 12), __ATOMIC_RELAXED);
      out.next = __atomic_load_n(reinterpret_cast<const uint16_t*>(p + 14), __ATOMIC_RELAXED);
      return nullptr;
    }
    s.cut_copy(kDescRing, offset, raw.data(), raw.size(), false);
  } else if (const Failure* f = s.slow(kDescRing, offset, raw.data(), raw.size(), false);
             f != nullptr) {
    return f;
  }
  std::memcpy(&out.addr, raw.data(), 8);
  std::memcpy(&out.len, raw.data() + 8, 4);
  std::memcpy(&out.flags, raw.data() + 12, 2);
  std::memcpy(&out.next, raw.data() + 14, 2);
  return nullptr;
}

const Failure* VringCache::Batch::used_entry_out_of_line(CacheState& s, bool held, uint64_t offset,
                                                         uint32_t id, uint32_t len) {
  std::array<uint32_t, 2> elem{id, len};
  if (!s.use_cached(held)) return s.slow(kUsedRing, offset, elem.data(), sizeof(elem), true);
  if (std::byte* p = s.locate(kUsedRing, offset, sizeof(elem)); p != nullptr) {
    __atomic_store_n(reinterpret_cast<uint32_t*>(p), id, __ATOMIC_RELAXED);
    __atomic_store_n(reinterpret_cast<uint32_t*>(p + 4), len, __ATOMIC_RELAXED);
  } else {
    s.cut_copy(kUsedRing, offset, elem.data(), sizeof(elem), true);
  }
  return nullptr;
}

}  // namespace iomm
