#include "iomm/vring_cache.hpp"

#include <array>
#include <atomic>
#include <bit>
#include <cstddef>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

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

enum RingId : size_t { kDesc = 0, kAvail = 1, kUsed = 2 };

constexpr uint64_t kDescBytes = 16;
constexpr uint64_t kUsedElemBytes = 8;

struct Segment {
  uint64_t offset;  // from the ring's start
  uint64_t length;
  std::byte* host;
};

struct Ring {
  uint64_t iova = 0;
  uint64_t bytes = 0;
  uint32_t prot = 0;
  // Data path only: filled by revalidation, read by fast accesses.
  std::vector<Segment> segments;
  std::byte* whole = nullptr;  // the ring in one run (the common case)
  std::unique_ptr<IntervalNotifier> notifier;
};

// Error codes of the contract: what is not ENOENT or EPERM means the memory
// cannot be reached (live update, simulated memory): EFAULT.
Error ring_error(Error e) {
  if (e.code() == ENOENT || e.code() == EPERM) return e;
  return Error(EFAULT, "the ring's memory cannot be reached: " + e.describe());
}

}  // namespace

struct CacheState {
  std::shared_ptr<Ioas> ioas;
  VringLayout layout;
  uint16_t mask = 0;
  bool asymmetric = false;  // membarrier pairs with a compiler barrier

  // The handshake with the callbacks (Dekker): the data path sets `busy`,
  // fences, then reads `valid`; a callback clears `valid` (and stamps the
  // notifier), fences, then reads `busy`. One of them sees the other.
  std::atomic<bool> busy{false};
  std::atomic<bool> valid{false};
  // Orders a revalidation's read_retry and publication against the
  // callbacks' set_seq.
  sync::RankedMutex mu{sync::LockRank::vring_cache, "VringCache mu"};

  std::atomic<uint64_t> fast_count{0};
  std::atomic<uint64_t> slow_count{0};
  std::atomic<uint64_t> invalidations{0};
  std::atomic<uint64_t> revalidations{0};

  std::array<Ring, 3> rings;
  // Data path only: the rings were found in memory that cannot be cached,
  // at these sequences.
  bool uncacheable = false;
  std::array<uint64_t, 3> uncacheable_seqs{};

  static void bump(std::atomic<uint64_t>& c) noexcept {
    // One writer (the data path): no locked add.
    c.store(c.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  }

  void enter() noexcept {
    busy.store(true, std::memory_order_relaxed);
    sync::light_fence(asymmetric);
  }
  void leave() noexcept { busy.store(false, std::memory_order_release); }

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
    if (busy.load(std::memory_order_acquire)) {
      if (!inv.blocking) return false;
      // An access is a few loads or one short copy that takes no lock.
      while (busy.load(std::memory_order_acquire)) std::this_thread::yield();
    }
    invalidations.fetch_add(1, std::memory_order_relaxed);
    return true;
  }

  // Look the rings up again under the read_begin / read_retry protocol.
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
      return false;  // stays on the slow path
    }
    uncacheable = false;
    std::lock_guard lk(mu);
    if (changed_since(seqs)) return false;
    for (size_t r = 0; r < rings.size(); ++r) {
      rings[r].segments = std::move(found[r]);
      rings[r].whole = rings[r].segments.size() == 1 ? rings[r].segments[0].host : nullptr;
    }
    valid.store(true, std::memory_order_release);
    bump(revalidations);
    return true;
  }

  [[nodiscard]] bool changed_since(const std::array<uint64_t, 3>& seqs) const noexcept {
    for (size_t r = 0; r < rings.size(); ++r) {
      if (rings[r].notifier->read_retry(seqs[r])) return true;
    }
    return false;
  }

  // Where `n` bytes at `offset` of the ring live, if in one run.
  static std::byte* locate(const Ring& ring, uint64_t offset, uint64_t n) noexcept {
    if (ring.whole != nullptr) return ring.whole + offset;
    for (const Segment& s : ring.segments) {
      if (offset >= s.offset && offset - s.offset < s.length) {
        return offset - s.offset + n <= s.length ? s.host + (offset - s.offset) : nullptr;
      }
    }
    return nullptr;
  }

  // Runs `access` on the field's host address inside the handshake; false
  // when the pointers are not valid (or the field straddles two runs).
  template <typename F>
  bool fast(RingId r, uint64_t offset, uint64_t n, F&& access) {
    if (!valid.load(std::memory_order_relaxed) && !revalidate()) return false;
    enter();
    if (!valid.load(std::memory_order_acquire)) {
      leave();
      return false;
    }
    std::byte* p = locate(rings[r], offset, n);
    if (p == nullptr) {
      leave();
      return false;
    }
    access(p);
    leave();
    bump(fast_count);
    return true;
  }

  // A translated, guarded copy of one field. It runs inside the handshake
  // too, so a blocking callback waits for it and a copy that started after
  // an invalidation began sees the new sequence and touches nothing; after
  // it, for user memory, the monitor's pending events are settled and the
  // sequence checked again: a copy that raced is EFAULT.
  Status slow(RingId r, uint64_t offset, void* buf, size_t n, bool write) {
    Ring& ring = rings[r];
    const uint64_t seq = ring.notifier->read_begin();
    auto segs = ioas->host_segments(ring.iova + offset, n, write ? kProtWrite : kProtRead);
    if (!segs.ok()) return ring_error(std::move(segs).error());
    bool copied = true;
    bool user = false;
    enter();
    if (ring.notifier->read_retry(seq)) {
      leave();
      return Error(EFAULT, "the ring was invalidated during the access");
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
    if (user) {
      if (Status s = monitor::settle_user_copies(); !s) return s;
    }
    if (!copied) return Error(EFAULT, "the ring's memory is gone");
    if (ring.notifier->read_retry(seq)) {
      return Error(EFAULT, "the ring was invalidated during the access");
    }
    bump(slow_count);
    return {};
  }

  // Order: __ATOMIC_RELAXED, __ATOMIC_ACQUIRE (loads), __ATOMIC_RELEASE
  // (stores).
  template <typename T, int Order = __ATOMIC_RELAXED>
  Result<T> load(RingId r, uint64_t offset) {
    T v{};
    if (fast(r, offset, sizeof(T),
             [&](std::byte* p) { v = __atomic_load_n(reinterpret_cast<T*>(p), Order); })) {
      return v;
    }
    if (Status s = slow(r, offset, &v, sizeof(T), false); !s) return s.error();
    if constexpr (Order == __ATOMIC_ACQUIRE) std::atomic_thread_fence(std::memory_order_acquire);
    return v;
  }

  template <typename T, int Order = __ATOMIC_RELAXED>
  Status store(RingId r, uint64_t offset, T v) {
    if (fast(r, offset, sizeof(T),
             [&](std::byte* p) { __atomic_store_n(reinterpret_cast<T*>(p), v, Order); })) {
      return {};
    }
    if constexpr (Order == __ATOMIC_RELEASE) std::atomic_thread_fence(std::memory_order_release);
    return slow(r, offset, &v, sizeof(T), true);
  }
};

}  // namespace vring

using vring::CacheState;
using vring::kAvail;
using vring::kDesc;
using vring::kUsed;

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
  const std::array<uint64_t, 3> bytes{vring::kDescBytes * size, 4 + 2ULL * size + event,
                                      4 + vring::kUsedElemBytes * size + event};
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

Result<uint16_t> VringCache::avail_flags() { return state_->load<uint16_t>(kAvail, 0); }

Result<uint16_t> VringCache::avail_idx() {
  return state_->load<uint16_t, __ATOMIC_ACQUIRE>(kAvail, 2);
}

Result<uint16_t> VringCache::avail_entry(uint16_t slot) {
  return state_->load<uint16_t>(kAvail, 4 + 2ULL * (slot & state_->mask));
}

Result<uint16_t> VringCache::used_event() {
  if (!state_->layout.event_idx) return Error(EINVAL, "VIRTIO_RING_F_EVENT_IDX not negotiated");
  return state_->load<uint16_t>(kAvail, 4 + 2ULL * state_->layout.size);
}

Result<VringDesc> VringCache::desc(uint16_t index) {
  if (index >= state_->layout.size) return Error(EINVAL, "descriptor index past the queue size");
  // Masked as well as checked: the index comes from the guest, and the mask
  // holds under speculation too.
  const uint64_t base = vring::kDescBytes * (index & state_->mask);
  VringDesc d;
  auto& s = *state_;
  if (s.fast(kDesc, base, vring::kDescBytes, [&](std::byte* p) {
        d.addr = __atomic_load_n(reinterpret_cast<uint64_t*>(p), __ATOMIC_RELAXED);
        d.len = __atomic_load_n(reinterpret_cast<uint32_t*>(p + 8), __ATOMIC_RELAXED);
        d.flags = __atomic_load_n(reinterpret_cast<uint16_t*>(p + 12), __ATOMIC_RELAXED);
        d.next = __atomic_load_n(reinterpret_cast<uint16_t*>(p + 14), __ATOMIC_RELAXED);
      })) {
    return d;
  }
  std::array<std::byte, vring::kDescBytes> raw{};
  if (Status st = s.slow(kDesc, base, raw.data(), raw.size(), false); !st) return st.error();
  std::memcpy(&d.addr, raw.data(), 8);
  std::memcpy(&d.len, raw.data() + 8, 4);
  std::memcpy(&d.flags, raw.data() + 12, 2);
  std::memcpy(&d.next, raw.data() + 14, 2);
  return d;
}

Status VringCache::set_used_entry(uint16_t slot, uint32_t id, uint32_t len) {
  const uint64_t base = 4 + vring::kUsedElemBytes * (slot & state_->mask);
  auto& s = *state_;
  if (s.fast(kUsed, base, vring::kUsedElemBytes, [&](std::byte* p) {
        __atomic_store_n(reinterpret_cast<uint32_t*>(p), id, __ATOMIC_RELAXED);
        __atomic_store_n(reinterpret_cast<uint32_t*>(p + 4), len, __ATOMIC_RELAXED);
      })) {
    return {};
  }
  std::array<uint32_t, 2> elem{id, len};
  return s.slow(kUsed, base, elem.data(), sizeof(elem), true);
}

Status VringCache::set_used_idx(uint16_t idx) {
  return state_->store<uint16_t, __ATOMIC_RELEASE>(kUsed, 2, idx);
}

Result<uint16_t> VringCache::used_idx() { return state_->load<uint16_t>(kUsed, 2); }

Status VringCache::set_used_flags(uint16_t flags) {
  return state_->store<uint16_t>(kUsed, 0, flags);
}

Status VringCache::set_avail_event(uint16_t idx) {
  if (!state_->layout.event_idx) return Error(EINVAL, "VIRTIO_RING_F_EVENT_IDX not negotiated");
  return state_->store<uint16_t>(kUsed, 4 + vring::kUsedElemBytes * state_->layout.size, idx);
}

const VringLayout& VringCache::layout() const noexcept { return state_->layout; }

bool VringCache::cached() const noexcept { return state_->valid.load(std::memory_order_relaxed); }

VringCacheStats VringCache::stats() const noexcept {
  const auto& s = *state_;
  return {s.fast_count.load(std::memory_order_relaxed),
          s.slow_count.load(std::memory_order_relaxed),
          s.invalidations.load(std::memory_order_relaxed),
          s.revalidations.load(std::memory_order_relaxed)};
}

}  // namespace iomm
