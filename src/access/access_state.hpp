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

  // Per-page pins (pin_pages): a reference count per IOVA page, in chunks
  // of kChunkPages keyed by iova >> (12 + kChunkShift). The backing pin store
  // holds one pin per page with a non-zero count. Guarded by page_mu, which
  // is never held while pages are locked (lock order: docs/design.md).
  static constexpr unsigned kChunkShift = 4;
  static constexpr unsigned kChunkPages = 1U << kChunkShift;
  struct PageChunk {
    uint32_t refs[kChunkPages] = {};
    uint32_t busy = 0;  // pin_pages calls between their check and commit
    [[nodiscard]] bool idle() const noexcept {
      if (busy != 0) return false;
      for (uint32_t r : refs) {
        if (r != 0) return false;
      }
      return true;
    }
  };
  mutable sync::RankedMutex page_mu{sync::LockRank::access_pages, "AccessState::page_mu"};
  std::map<uint64_t, PageChunk> page_chunks;  // guarded by page_mu
  std::atomic<uint64_t> page_pins{0};         // pages with a non-zero count

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
