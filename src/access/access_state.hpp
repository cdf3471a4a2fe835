// Internal state of an access. Its unmap callback is driven by an interval
// notifier over the whole IOVA space of its IOAS (see access.cpp).
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "ioas/area.hpp"
#include "iomm/access.hpp"
#include "iomm/notifier.hpp"
#include "mem/page_counts.hpp"
#include "sync/ranked_mutex.hpp"

namespace iomm::access {

struct PinSlice {
  std::shared_ptr<ioas::Area> area;
  uint64_t iova;
  uint64_t length;
};

struct PinRecord {
  uint64_t length;
  std::vector<PinSlice> slices;
};

struct AccessState;

// A pin (range or pages) between the start of its checks and its record (or
// its failure): an unmap of a range it overlaps calls the access, since the
// pin may land there. Lives on the pinning thread's stack, linked into
// AccessState::flights under mu, so pinning allocates nothing for it.
class Flight {
 public:
  Flight(AccessState& access, const IovaRange& range);
  ~Flight();
  Flight(const Flight&) = delete;
  Flight& operator=(const Flight&) = delete;

  // Unlink now; AccessState::mu held (the pin records itself under the same
  // hold, so an unmap sees it either in flight or recorded).
  void land_locked() noexcept;

  [[nodiscard]] const IovaRange& range() const noexcept { return range_; }
  [[nodiscard]] const Flight* next() const noexcept { return next_; }

 private:
  AccessState& access_;
  const IovaRange range_;
  Flight* prev_ = nullptr;
  Flight* next_ = nullptr;
  bool linked_ = false;
};

struct AccessState {
  AccessState(std::shared_ptr<Ioas> io, UnmapCallback cb)
      : ioas(std::move(io)), on_unmap(std::move(cb)) {}

  const std::shared_ptr<Ioas> ioas;
  const UnmapCallback on_unmap;
  // Over the whole IOVA space of ioas: every unmap's invalidation reaches it,
  // and its callback calls on_unmap when may_pin(range). Destroyed (waiting
  // for a running callback) before the access's pins are released.
  std::unique_ptr<IntervalNotifier> watch;

  mutable sync::RankedMutex mu{sync::LockRank::access_pins, "AccessState::mu"};
  std::multimap<uint64_t, PinRecord> pins;  // by iova; guarded by mu
  uint64_t pinned_bytes = 0;                // guarded by mu
  Flight* flights = nullptr;                // pins in flight; guarded by mu

  // Per-page pins (pin_pages): a reference count per IOVA page (indexed by
  // iova >> 12). Each page with a non-zero count holds one 4 KiB page pin of
  // its backing object (MemObject::pin_pages). Guarded by page_mu, which is
  // never held while pages are locked (lock order: docs/design.md); a
  // pin_pages call holds the blocks of its range busy while it pins without
  // page_mu, so a concurrent unpin cannot free them.
  mutable sync::RankedMutex page_mu{sync::LockRank::access_pages, "AccessState::page_mu"};
  mem::PageCounts page_counts;         // guarded by page_mu
  std::atomic<uint64_t> page_pins{0};  // pages with a non-zero count

  // Whether this access holds, or is pinning, anything in r: a pin record, a
  // pin in flight or a page pin overlapping it.
  [[nodiscard]] bool may_pin(const IovaRange& r) const;
  // Whether it certainly holds and is pinning nothing in r, decided without
  // sleeping: false when it may, or when mu is busy (try-lock).
  [[nodiscard]] bool holds_nothing_in(const IovaRange& r) const noexcept;
  // Whether a page pin lies in r (takes page_mu).
  [[nodiscard]] bool page_pins_overlap(const IovaRange& r) const;
};

// Drop every page pin (access destruction). Never fails.
void release_all_page_pins(AccessState& a) noexcept;

// OR into out (bit i = page first_page + i) the pages this access holds
// pinned, by range or by page.
void collect_pinned(const AccessState& a, uint64_t first_page, uint64_t npages,
                    std::span<uint64_t> out);

}  // namespace iomm::access
