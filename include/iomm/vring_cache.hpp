// Virtqueue metadata cache: direct pointers to a split ring's descriptor
// table, available ring and used ring, kept valid by interval notifiers
// instead of pins (seed 002, vhost's "metadata acceleration").
//
// Contract
// - Ownership: the cache is a unique_ptr owned by the ring's consumer (one
//   data-path thread per ring). It keeps the Ioas alive and owns the three
//   IntervalNotifiers over the rings' IOVA ranges. It pins nothing and
//   charges nothing. A Batch borrows the cache: destroy it first.
// - Addresses are IOVAs of the given Ioas (for vhost-user: the IOTLB's IOVA
//   space, or an Ioas mapping the front end's addresses). A ring may span
//   several mappings; each contiguous host run is cached separately.
// - Batches: a back end opens one VringCache::Batch per pass over the ring
//   (read avail->idx, the entries and descriptors, write used entries and
//   used->idx) and pays the validity handshake once, when it opens. While a
//   batch that found the pointers valid (Batch::cached()) is open, its
//   accessors are inline plain loads and stores through the cached
//   pointers (`__atomic`, acquire/release where the virtio spec orders
//   them), with no translation, no lock, no system call, no counter and no
//   check of the pointers' validity: the batch itself holds off
//   invalidation.
//   A batch must be short and must not be held across a blocking wait: no
//   I/O on the request's buffers, no sleep, no waiting for another thread
//   or for the memory monitor, no lock another thread may hold while it
//   unmaps or invalidates (that thread waits in the cache's callback for
//   the batch to close: a deadlock), and no map or unmap of the Ioas from
//   the data-path thread. Close it before processing a request and open a
//   new one for the used entry. Opening and closing cost a few loads and
//   stores, no fence instruction where membarrier(2) is available.
// - A batch's errors are sticky: its accessors return plain values, and
//   the first access that fails records its error in the batch (status(),
//   ok()) and returns a zeroed value. Check status() once at the end of the
//   pass (or earlier, to stop early). After the first error, every value
//   the batch returns is meaningless (zero) and no write is performed: a
//   pass that failed half-way writes nothing further to the used ring, and
//   the caller must not publish what it computed from those values.
// - Batch::run(f) checks once per pass whether the batch can skip the test
//   of each ring's pointer: when it holds cached pointers and each ring is
//   one host run (the common case), it calls f with a Batch::Direct, whose
//   accessors are the batch's with no test per access but the descriptor
//   index's; otherwise with the Batch itself. f is generic (auto&), so the
//   compiler generates the direct pass as a loop over plain pointers. The
//   sticky error holds in both: a Direct that fails points its rings at a
//   zeroed dummy and a write sink (vring::kDeadRing, dead_used_ring), so
//   later reads return 0 and later writes reach no ring with no test per
//   write; run() records its first error in the batch when f returns.
//   Inside f, use only the view f is given.
// - The cache's own accessors (VringCache::avail_idx() etc.) are one-access
//   batches: each pays the handshake. Calling them, or opening a batch,
//   while a batch is open on the same thread is allowed (a nested batch
//   uses the outer one's pointers); one data-path thread per cache.
// - Invalidation: a notifier callback marks the ring's pointers invalid. In
//   non-blocking mode it refuses (returns false: the kernel's EAGAIN) while
//   a batch that uses cached pointers is open; in blocking mode it waits
//   until that batch is closed (yielding, then sleeping in 100 us steps),
//   so no access uses a pointer after the callback returns. The wait is
//   bounded by the batch, which the rule above keeps short; a batch that
//   holds an invalidation off for 10 s is a broken caller and aborts with a
//   message (IOMM_CHECK), never a silent hang. An invalidation is seen
//   between batches only: a batch open with cached pointers reads and
//   writes the memory that was mapped when it opened, to its end.
// - Fallback: a batch opened while the pointers are invalid first
//   re-validates (looks the rings up again under the read_begin /
//   read_retry protocol: once the mappings are back, the batch uses cached
//   pointers); if that fails, each of its accesses is a translated, guarded
//   copy through the Ioas that checks the notifier's sequence around the
//   copy: a copy that raced with an invalidation is discarded and reported
//   as EFAULT. Such a batch does not hold invalidations off.
// - Memory that is not the library's own mapping (user memory, files that
//   may shrink) is never accessed through plain pointers: it is always
//   copied with guarded copies.
// - Threads: not thread-safe on the data path (one thread per cache and
//   its batches). The invalidating thread may be any thread. stats() and
//   cached() may be called from any thread.
//
// Errors (the cache's accessors' Result / Status, a batch's status())
// - ENOENT    part of a ring is not mapped in the Ioas (an IOTLB miss: the
//             caller may ask for the mapping and retry, in a new batch).
// - EFAULT    the memory behind a mapping is gone (unmapped, truncated), or a
//             copy raced with an invalidation.
// - EPERM     the used ring is mapped without write permission.
// - EINVAL    a descriptor index >= size; used_event / set_avail_event
//             without event_idx; (create) size not a power of two in
//             [1, 32768], misaligned ring addresses (desc 16, avail 2, used
//             4), a ring range that wraps.
// Opening a batch cannot fail: errors are reported by its accesses, with a
// fixed message per case.
//
// Statistics count batches (each one-access accessor is one) and the
// accesses that are guarded copies, never an access through cached
// pointers: the fast path keeps no counter.
#pragma once

#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>

#include "iomm/export.hpp"
#include "iomm/result.hpp"

namespace iomm {

class Ioas;

namespace vring {
struct CacheState;

// Internal to the cache and its batches: the rings' byte layout, what an
// open batch reads through, and what it failed with.
enum RingId : size_t { kDescRing = 0, kAvailRing = 1, kUsedRing = 2 };
inline constexpr uint64_t kDescBytes = 16;
inline constexpr uint64_t kUsedElemBytes = 8;
inline constexpr uint64_t kRingHeader = 4;  // flags, idx

struct BatchView {
  // Each ring's host address when the batch holds cached pointers and the
  // ring is one host run; null otherwise (the access goes out of line),
  // and all null once the batch has failed.
  std::array<std::byte*, 3> base{};
  uint16_t mask = 0;  // size - 1
  uint16_t size = 0;
  bool event_idx = false;
  // The batch holds invalidations off (it found the pointers valid).
  bool held = false;
};

// A batch's first error: fixed, so that recording one is a pointer store.
struct Failure {
  int code;
  const char* message;
};
inline constexpr Failure kBadIndex{EINVAL, "descriptor index past the queue size"};
inline constexpr Failure kNoEventIdx{EINVAL, "VIRTIO_RING_F_EVENT_IDX not negotiated"};

// Where a failed direct view (Batch::Direct) points its rings: with its
// mask and size set to 0, every field it can reach lies in the first 16
// bytes. Reads see zeros; writes (relaxed atomics, from any data-path
// thread) land in a sink that nothing reads, so none reaches a ring.
alignas(16) inline constexpr std::array<std::byte, 16> kDeadRing{};
alignas(16) inline std::array<std::byte, 16> dead_used_ring{};
}  // namespace vring

// One descriptor of a split virtqueue (virtio 1.x, little-endian).
struct VringDesc {
  uint64_t addr = 0;
  uint32_t len = 0;
  uint16_t flags = 0;
  uint16_t next = 0;
};

namespace vring {
// A descriptor at p in a ring the guest may write meanwhile: each field one
// relaxed load, as the device side of a split ring reads it.
inline VringDesc load_desc(const std::byte* p) {
  VringDesc d;
  d.addr = __atomic_load_n(reinterpret_cast<const uint64_t*>(p), __ATOMIC_RELAXED);
  d.len = __atomic_load_n(reinterpret_cast<const uint32_t*>(p + 8), __ATOMIC_RELAXED);
  d.flags = __atomic_load_n(reinterpret_cast<const uint16_t*>(p + 12), __ATOMIC_RELAXED);
  d.next = __atomic_load_n(reinterpret_cast<const uint16_t*>(p + 14), __ATOMIC_RELAXED);
  return d;
}
}  // namespace vring

inline constexpr uint16_t kVringDescFNext = 1;
inline constexpr uint16_t kVringDescFWrite = 2;
inline constexpr uint16_t kVringDescFIndirect = 4;

struct VringLayout {
  uint64_t desc_iova = 0;
  uint64_t avail_iova = 0;
  uint64_t used_iova = 0;
  uint16_t size = 0;
  // VIRTIO_RING_F_EVENT_IDX: the rings carry used_event / avail_event.
  bool event_idx = false;
};

struct VringCacheStats {
  // Batches (one-access accessors included) that opened with cached
  // pointers, and those that did not (their accesses are guarded copies).
  uint64_t cached_batches = 0;
  uint64_t uncached_batches = 0;
  uint64_t slow_accesses = 0;  // guarded, translated copies
  uint64_t invalidations = 0;
  uint64_t revalidations = 0;  // pointers re-established
  // Non-blocking callbacks refused because a batch held the pointers (the
  // invalidation then waited for it in blocking mode).
  uint64_t refusals = 0;
};

class IOMM_API VringCache {
 public:
  class Batch;

  static Result<std::unique_ptr<VringCache>> create(const std::shared_ptr<Ioas>& ioas,
                                                    const VringLayout& layout);
  ~VringCache();
  VringCache(const VringCache&) = delete;
  VringCache& operator=(const VringCache&) = delete;

  // Opens a batch: one pass over the ring (see the contract above).
  [[nodiscard]] Batch batch();

  // One-access batches, for callers that touch the ring once in a while.
  // Available ring.
  Result<uint16_t> avail_flags();
  Result<uint16_t> avail_idx();                 // acquire: entries up to it are visible
  Result<uint16_t> avail_entry(uint16_t slot);  // ring[slot % size]
  Result<uint16_t> used_event();                // needs event_idx
  // Descriptor table.
  Result<VringDesc> desc(uint16_t index);  // EINVAL index >= size
  // Used ring.
  Status set_used_entry(uint16_t slot, uint32_t id, uint32_t len);
  Status set_used_idx(uint16_t idx);  // release: entries before it are visible
  Result<uint16_t> used_idx();
  Status set_used_flags(uint16_t flags);
  Status set_avail_event(uint16_t idx);  // needs event_idx

  [[nodiscard]] const VringLayout& layout() const noexcept;
  // Whether the next batch can use cached pointers (all three rings valid).
  [[nodiscard]] bool cached() const noexcept;
  [[nodiscard]] VringCacheStats stats() const noexcept;

 private:
  explicit VringCache(std::unique_ptr<vring::CacheState> state);
  std::unique_ptr<vring::CacheState> state_;
};

// One pass over the ring with one validity handshake and a sticky error.
// Data-path thread only; not movable (it lives in the scope of the pass).
// The accessors mean what the cache's accessors of the same name mean, and
// return 0 (or a zeroed descriptor) once the batch has failed.
class IOMM_API VringCache::Batch {
 public:
  class Direct;

  // Inline, with the accessors: a batch whose address never escapes lives
  // in registers for the length of the pass.
  explicit Batch(VringCache& cache) : state_(cache.state_.get()), view_(open(*state_)) {}
  ~Batch() { close(*state_, view_.held); }  // a waiting invalidation may proceed
  Batch(const Batch&) = delete;
  Batch& operator=(const Batch&) = delete;

  // Whether this batch reads and writes through cached pointers (and holds
  // invalidations off); false: every access is a guarded copy.
  [[nodiscard]] bool cached() const noexcept { return view_.held; }

  // Calls f(Direct&) when this batch holds cached pointers, each ring is
  // one host run and no access has failed; f(Batch&) otherwise (see the
  // contract). Returns what f returns, which must be the same type for
  // both.
  template <typename F>
  std::invoke_result_t<F&, Batch&> run(F&& f);

  // No access of this batch has failed (so far).
  [[nodiscard]] bool ok() const noexcept { return failure_ == nullptr; }
  // The first error of this batch (see "Errors" above).
  [[nodiscard]] Status status() const {
    if (failure_ == nullptr) return {};
    return Error(failure_->code, failure_->message);
  }

  uint16_t avail_flags() { return load16<__ATOMIC_RELAXED>(vring::kAvailRing, 0); }
  uint16_t avail_idx() { return load16<__ATOMIC_ACQUIRE>(vring::kAvailRing, 2); }
  uint16_t avail_entry(uint16_t slot) {
    return load16<__ATOMIC_RELAXED>(vring::kAvailRing,
                                    vring::kRingHeader + 2ULL * (slot & view_.mask));
  }
  uint16_t used_event() {
    if (!view_.event_idx) [[unlikely]] {
      return fail(vring::kNoEventIdx);
    }
    return load16<__ATOMIC_RELAXED>(vring::kAvailRing, vring::kRingHeader + 2ULL * view_.size);
  }

  VringDesc desc(uint16_t index) {
    // index >= size (a power of two). Masked as well as checked: the index
    // comes from the guest, and the mask holds under speculation too.
    if (index > view_.mask) [[unlikely]] {
      fail(vring::kBadIndex);
      return {};
    }
    const uint64_t offset = vring::kDescBytes * (index & view_.mask);
    const std::byte* p = view_.base[vring::kDescRing];
    if (p == nullptr) [[unlikely]] {
      VringDesc d;
      if (ok()) record(desc_out_of_line(*state_, view_.held, offset, d));
      return d;
    }
    p += offset;
    return vring::load_desc(p);
  }

  void set_used_entry(uint16_t slot, uint32_t id, uint32_t len) {
    const uint64_t offset = vring::kRingHeader + vring::kUsedElemBytes * (slot & view_.mask);
    std::byte* p = view_.base[vring::kUsedRing];
    if (p == nullptr) [[unlikely]] {
      if (ok()) record(used_entry_out_of_line(*state_, view_.held, offset, id, len));
      return;
    }
    p += offset;
    __atomic_store_n(reinterpret_cast<uint32_t*>(p), id, __ATOMIC_RELAXED);
    __atomic_store_n(reinterpret_cast<uint32_t*>(p + 4), len, __ATOMIC_RELAXED);
  }
  void set_used_idx(uint16_t idx) { store16<__ATOMIC_RELEASE>(vring::kUsedRing, 2, idx); }
  uint16_t used_idx() { return load16<__ATOMIC_RELAXED>(vring::kUsedRing, 2); }
  void set_used_flags(uint16_t flags) { store16<__ATOMIC_RELAXED>(vring::kUsedRing, 0, flags); }
  void set_avail_event(uint16_t idx) {
    if (!view_.event_idx) [[unlikely]] {
      fail(vring::kNoEventIdx);
      return;
    }
    store16<__ATOMIC_RELAXED>(vring::kUsedRing,
                              vring::kRingHeader + vring::kUsedElemBytes * view_.size, idx);
  }

 private:
  template <int Order>
  uint16_t load16(vring::RingId ring, uint64_t offset) {
    const std::byte* p = view_.base[ring];
    if (p == nullptr) [[unlikely]] {
      uint16_t v = 0;
      if (ok()) {
        record(load16_out_of_line(*state_, view_.held, ring, offset, Order == __ATOMIC_ACQUIRE, v));
      }
      return v;
    }
    return __atomic_load_n(reinterpret_cast<const uint16_t*>(p + offset), Order);
  }
  template <int Order>
  void store16(vring::RingId ring, uint64_t offset, uint16_t v) {
    std::byte* p = view_.base[ring];
    if (p == nullptr) [[unlikely]] {
      if (ok()) {
        record(
            store16_out_of_line(*state_, view_.held, ring, offset, v, Order == __ATOMIC_RELEASE));
      }
      return;
    }
    __atomic_store_n(reinterpret_cast<uint16_t*>(p + offset), v, Order);
  }

  // The first error sticks; clearing the pointers sends every later access
  // out of line, where ok() stops it: the fast path needs no check of its
  // own.
  uint16_t fail(const vring::Failure& f) noexcept {
    record(&f);
    return 0;
  }
  void record(const vring::Failure* f) noexcept {
    if (f == nullptr || failure_ != nullptr) return;
    failure_ = f;
    view_.base = {};
  }

  // Static, taking nothing of the batch by address, so that the batch's
  // fields can stay in registers; the accesses' out-of-line paths are cold,
  // so that the compiler saves registers around them there rather than
  // keeping the loop's values out of the registers a call clobbers.
  static vring::BatchView open(vring::CacheState& state);
  static void close(vring::CacheState& state, bool held) noexcept;
  // Rings over several runs (with cached pointers) and guarded copies: the
  // value read goes to `out`; null, or what failed.
  [[gnu::cold]] static const vring::Failure* load16_out_of_line(vring::CacheState& state, bool held,
                                                                vring::RingId ring, uint64_t offset,
                                                                bool acquire, uint16_t& out);
  [[gnu::cold]] static const vring::Failure* store16_out_of_line(vring::CacheState& state,
                                                                 bool held, vring::RingId ring,
                                                                 uint64_t offset, uint16_t v,
                                                                 bool release);
  [[gnu::cold]] static const vring::Failure* desc_out_of_line(vring::CacheState& state, bool held,
                                                              uint64_t offset, VringDesc& out);
  [[gnu::cold]] static const vring::Failure* used_entry_out_of_line(vring::CacheState& state,
                                                                    bool held, uint64_t offset,
                                                                    uint32_t id, uint32_t len);

  vring::CacheState* state_;
  vring::BatchView view_;
  const vring::Failure* failure_ = nullptr;
};

// A batch's view over rings that are each one host run (Batch::run): the
// batch's accessors, meaning the same and with the same sticky error, with
// no test per access but the descriptor index's (and, for the event_idx
// fields, the feature's). Lives inside run(), in registers.
class IOMM_API VringCache::Batch::Direct {
 public:
  Direct(const Direct&) = delete;
  Direct& operator=(const Direct&) = delete;

  [[nodiscard]] bool cached() const noexcept { return true; }
  [[nodiscard]] bool ok() const noexcept { return failure_ == nullptr; }
  [[nodiscard]] Status status() const {
    if (failure_ == nullptr) return {};
    return Error(failure_->code, failure_->message);
  }

  uint16_t avail_flags() { return load16<__ATOMIC_RELAXED>(avail_, 0); }
  uint16_t avail_idx() { return load16<__ATOMIC_ACQUIRE>(avail_, 2); }
  uint16_t avail_entry(uint16_t slot) {
    return load16<__ATOMIC_RELAXED>(avail_, vring::kRingHeader + 2ULL * (slot & mask_));
  }
  uint16_t used_event() {
    if (!event_idx_) [[unlikely]] {
      fail(vring::kNoEventIdx);
      return 0;
    }
    return load16<__ATOMIC_RELAXED>(avail_, vring::kRingHeader + 2ULL * size_);
  }

  VringDesc desc(uint16_t index) {
    // Masked as well as checked, as in the batch. After a failure the mask
    // is 0, so this sends every index but 0 here again (the error sticks).
    if (index > mask_) [[unlikely]] {
      fail(vring::kBadIndex);
      return {};
    }
    const std::byte* p = desc_ + vring::kDescBytes * (index & mask_);
    return vring::load_desc(p);
  }

  void set_used_entry(uint16_t slot, uint32_t id, uint32_t len) {
    std::byte* p = used_ + vring::kRingHeader + vring::kUsedElemBytes * (slot & mask_);
    __atomic_store_n(reinterpret_cast<uint32_t*>(p), id, __ATOMIC_RELAXED);
    __atomic_store_n(reinterpret_cast<uint32_t*>(p + 4), len, __ATOMIC_RELAXED);
  }
  void set_used_idx(uint16_t idx) { store16<__ATOMIC_RELEASE>(2, idx); }
  uint16_t used_idx() {
    // After a failure used_ is the write sink, which holds what was
    // written to it: the one read that needs the test.
    if (failure_ != nullptr) return 0;
    return load16<__ATOMIC_RELAXED>(used_, 2);
  }
  void set_used_flags(uint16_t flags) { store16<__ATOMIC_RELAXED>(0, flags); }
  void set_avail_event(uint16_t idx) {
    if (!event_idx_) [[unlikely]] {
      fail(vring::kNoEventIdx);
      return;
    }
    store16<__ATOMIC_RELAXED>(vring::kRingHeader + vring::kUsedElemBytes * size_, idx);
  }

 private:
  friend class Batch;
  explicit Direct(const vring::BatchView& v) noexcept
      : desc_(v.base[vring::kDescRing]),
        avail_(v.base[vring::kAvailRing]),
        used_(v.base[vring::kUsedRing]),
        mask_(v.mask),
        size_(v.size),
        event_idx_(v.event_idx) {}

  template <int Order>
  static uint16_t load16(const std::byte* ring, uint64_t offset) {
    return __atomic_load_n(reinterpret_cast<const uint16_t*>(ring + offset), Order);
  }
  template <int Order>
  void store16(uint64_t offset, uint16_t v) {
    __atomic_store_n(reinterpret_cast<uint16_t*>(used_ + offset), v, Order);
  }

  // The first error sticks; every later access goes to the dead rings
  // (mask and size 0 keep it in their 16 bytes).
  void fail(const vring::Failure& f) noexcept {
    if (failure_ == nullptr) failure_ = &f;
    desc_ = vring::kDeadRing.data();
    avail_ = vring::kDeadRing.data();
    used_ = vring::dead_used_ring.data();
    mask_ = 0;
    size_ = 0;
  }

  const std::byte* desc_;
  const std::byte* avail_;
  std::byte* used_;
  uint16_t mask_;
  uint16_t size_;
  bool event_idx_;
  const vring::Failure* failure_ = nullptr;
};

template <typename F>
std::invoke_result_t<F&, VringCache::Batch&> VringCache::Batch::run(F&& f) {
  using R = std::invoke_result_t<F&, Batch&>;
  static_assert(std::is_same_v<R, std::invoke_result_t<F&, Direct&>>,
                "a Batch::run visitor returns the same type for both views");
  // The one check of the pass: the pointers are set only while the batch
  // holds them and has not failed.
  if (view_.base[vring::kDescRing] == nullptr || view_.base[vring::kAvailRing] == nullptr ||
      view_.base[vring::kUsedRing] == nullptr) {
    return f(*this);
  }
  Direct d(view_);
  if constexpr (std::is_void_v<R>) {
    f(d);
    record(d.failure_);
  } else {
    R r = f(d);
    record(d.failure_);
    return r;
  }
}

inline VringCache::Batch VringCache::batch() { return Batch(*this); }

}  // namespace iomm
