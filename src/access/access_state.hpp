// Internal state of an access and the unmap notification protocol.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "ioas/area.hpp"
#include "iomm/access.hpp"
#include "mem/page_counts.hpp"
#include "sync/ranked_mutex.hpp"

namespace iomm::ioas {
struct IoasState;
}

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

struct AccessState {
  AccessState(std::shared_ptr<Ioas> io, UnmapCallback cb)
      : ioas(std::move(io)), on_unmap(std::move(cb)) {}

  const std::shared_ptr<Ioas> ioas;
  const UnmapCallback on_unmap;

  mutable sync::RankedMutex mu{sync::LockRank::access_pins, "AccessState::mu"};
  std::multimap<uint64_t, PinRecord> pins;  // by iova; guarded by mu
  uint64_t pinned_bytes = 0;                // guarded by mu
  // Pins past their checks but not yet recorded: an unmap must call us.
  std::atomic<uint32_t> pins_in_flight{0};

  // Callbacks running now; raised under the IOAS's accesses_mu.
  sync::RankedMutex callback_mu{sync::LockRank::access_callback, "AccessState::callback_mu"};
  sync::CondVar callback_done;
  uint32_t callbacks_running = 0;  // guarded by callback_mu

  // Per-page pins (pin_pages): a reference count per IOVA page (indexed by
  // iova >> 12). Each page with a non-zero count holds one 4 KiB page pin of
  // its backing object (MemObject::pin_pages). Guarded by page_mu, which is
  // never held while pages are locked (lock order: docs/design.md); a
  // pin_pages call holds the blocks of its range busy while it pins without
  // page_mu, so a concurrent unpin cannot free them.
  mutable sync::RankedMutex page_mu{sync::LockRank::access_pages, "AccessState::page_mu"};
  mem::PageCounts page_counts;         // guarded by page_mu
  std::atomic<uint64_t> page_pins{0};  // pages with a non-zero count

  // Whether this access may hold pins in r.
  [[nodiscard]] bool may_pin(const IovaRange& r) const;
  // Whether a page pin lies in r (takes page_mu).
  [[nodiscard]] bool page_pins_overlap(const IovaRange& r) const;
};

// Drop every page pin (access destruction). Never fails.
void release_all_page_pins(AccessState& a) noexcept;

// OR into out (bit i = page first_page + i) the pages this access holds
// pinned, by range or by page.
void collect_pinned(const AccessState& a, uint64_t first_page, uint64_t npages,
                    std::span<uint64_t> out);

// Call the unmap callback of every access of the IOAS that may hold pins in
// r, with no IOAS lock held.
void notify_unmap(ioas::IoasState& st, const IovaRange& r);

}  // namespace iomm::access
