// An area: one mapping of an IOAS, from its IOVA range onto a slice of a
// backing object.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "acct/owner.hpp"
#include "ioas/on_demand.hpp"
#include "iomm/domain.hpp"
#include "iomm/range.hpp"
#include "iomm/source.hpp"
#include "mem/mem_object.hpp"

namespace iomm::ioas {

enum class AreaState {
  filling,   // IOVA reserved; being pinned and mapped outside the tree lock
  live,      // usable by domains and accesses
  removing,  // being unmapped: no new access pins or rw
};

struct Area {
  // on_demand: allocates the OnDemand record (std::bad_alloc).
  Area(IovaRange r, MemorySource s, uint32_t p, std::shared_ptr<acct::Owner> o,
       bool on_demand = false)
      : range(r),
        source(std::move(s)),
        prot(p),
        owner(std::move(o)),
        demand(on_demand ? std::make_unique<OnDemand>() : nullptr) {}

  const IovaRange range;
  const MemorySource source;  // source.length() == range length
  const uint32_t prot;
  // Who pays for its pins; nullptr when uncharged (mode none, CAP_IPC_LOCK).
  const std::shared_ptr<acct::Owner> owner;
  // Set for an on-demand mapping (Ioas::map_on_demand): never pinned, never
  // charged (owner is null); its translations follow a notifier instead.
  const std::unique_ptr<OnDemand> demand;

  // Written under the IOAS tree lock held exclusively.
  AreaState state = AreaState::filling;
  // True while the IOAS's domains hold one pin on the whole area. Changed by
  // attach/detach (domains lock exclusive) or by the area's own map/unmap.
  std::atomic<bool> domain_pinned{false};
  // Access pins overlapping the area; raised under the tree lock held shared.
  mutable std::atomic<uint32_t> access_pins{0};
  // Of those, pins still locking pages (not yet recorded or failed). An
  // unmap waits for them to leave flight instead of counting retries
  // (IoasState::note_flight_exit).
  mutable std::atomic<uint32_t> pins_in_flight{0};
  // Live update: the host address was invalidated (Ioas::invalidate_host).
  // Domains keep translating; access pins and rw fail with EBUSY until
  // Ioas::replace_host installs a new source. Written under tree_mu
  // exclusive.
  bool host_invalid = false;
  // Next area removed by the same unmap: victims are chained through the
  // areas themselves so that unmapping never allocates. Set under the tree
  // lock held exclusively; read only by that unmap.
  Area* next_victim = nullptr;

  [[nodiscard]] uint64_t length() const noexcept { return source.length(); }
  // Backing offset of the byte at iova.
  [[nodiscard]] uint64_t backing_offset(uint64_t iova) const noexcept {
    return source.offset() + (iova - range.start);
  }
  // The domains' pin; an on-demand area has none.
  Status pin_all() const {
    if (demand != nullptr) return {};
    return source.object()->pin(owner.get(), source.offset(), source.length(),
                                (prot & kProtWrite) != 0);
  }
  void unpin_all() const noexcept {
    if (demand == nullptr) source.object()->unpin(owner.get(), source.offset(), source.length());
  }
};

}  // namespace iomm::ioas
