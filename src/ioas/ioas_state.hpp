// Internal state of an IOAS.
//
// Lock order: see docs/design.md, "Lock order". No IOAS lock is held while
// calling an access's unmap callback.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <vector>

#include "dirty/dirty_log.hpp"
#include "domain/page_table.hpp"
#include "ioas/area.hpp"
#include "iomm/ioas.hpp"
#include "sync/rcu.hpp"

namespace iomm::access {
struct AccessState;
}

namespace iomm::ioas {

struct Reservation {
  IovaRange range;
  const void* owner;  // the domain that reserved it, or nullptr for the user
};

// Teardown's "wait for lock-free readers": after translations were removed
// from `domains`, wait for an RCU grace period, then free the page-table
// pages those unmaps retired.
template <typename Domains>
void wait_for_readers(const Domains& domains) noexcept {
  const uint64_t horizon = domain::PageTable::retire_horizon();
  sync::rcu_synchronize();
  for (const auto& d : domains) d->page_table().free_retired(horizon);
}

struct IoasState {
  explicit IoasState(const IoasOptions& o) : options(o) {}

  const IoasOptions options;

  mutable std::shared_mutex tree_mu;
  std::map<uint64_t, std::shared_ptr<Area>> areas;  // by range.start
  std::vector<Reservation> reserved;                // sorted by range.start
  std::vector<IovaRange> allowed;                   // sorted, disjoint
  uint64_t mapped_bytes = 0;
  uint64_t access_count = 0;  // accesses attached (they need page alignment)

  mutable std::shared_mutex domains_mu;
  std::vector<std::shared_ptr<SoftDomain>> domains;  // guarded by domains_mu
  // Domains outside iomm (src/ioas/external.hpp) and their page sizes;
  // guarded by domains_mu.
  struct ExternalSlot {
    std::shared_ptr<ExternalDomain> domain;
    uint64_t page_size;
  };
  std::vector<ExternalSlot> external;

  mutable std::mutex accesses_mu;
  std::vector<access::AccessState*> accesses;  // guarded by accesses_mu

  // Access pins leaving flight (Area::pins_in_flight falling) bump
  // flight_exits and wake unmaps waiting for them. flight_mu is a leaf.
  std::mutex flight_mu;
  std::condition_variable flight_changed;
  uint64_t flight_exits = 0;  // guarded by flight_mu
  void note_flight_exit() noexcept {
    {
      std::lock_guard lk(flight_mu);
      ++flight_exits;
    }
    flight_changed.notify_all();
  }
  [[nodiscard]] uint64_t flight_exit_count() noexcept {
    std::lock_guard lk(flight_mu);
    return flight_exits;
  }

  // Pages written through the domains' DMA and through accesses, while
  // dirty tracking is on (Ioas::set_dirty_tracking). Domains reach it through
  // a pointer set at attach and cleared (before a grace period) at detach.
  dirty::DirtyLog dirty;
  // Areas whose host address is invalid (live update); tree_mu exclusive.
  uint64_t host_invalid_areas = 0;

  // Required alignment of IOVA, length and backing address (tree_mu).
  [[nodiscard]] uint64_t iova_alignment() const noexcept;
  // Largest minimum page size among domains (domain_alignment, tree_mu).
  uint64_t domain_alignment = 1;
  // Largest minimum page size among external domains (tree_mu).
  uint64_t external_alignment = 1;

  // --- tree queries; tree_mu held by the caller ---
  // Area overlapping [r.start, r.last] with the lowest start, or end().
  [[nodiscard]] std::map<uint64_t, std::shared_ptr<Area>>::const_iterator first_overlap(
      const IovaRange& r) const;
  [[nodiscard]] bool overlaps_area(const IovaRange& r) const;
  [[nodiscard]] bool overlaps_reserved(const IovaRange& r) const;
  [[nodiscard]] bool overlaps_allowed(const IovaRange& r) const;
  // Whether every area fits `alignment` (IOVA, length and backing address).
  [[nodiscard]] bool areas_aligned(uint64_t alignment) const;
  // First-fit IOVA for length bytes backed at `address`.
  [[nodiscard]] Result<uint64_t> allocate_iova(uint64_t length, uint64_t address) const;
  void insert_reservation(const Reservation& r);
};

}  // namespace iomm::ioas
