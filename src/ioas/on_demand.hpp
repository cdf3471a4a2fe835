// On-demand (unpinned) mappings: translations kept valid by an interval
// notifier on the area's source range instead of a pin
// (Ioas::map_on_demand; docs/design.md, "Invalidation notifiers").
//
// Each on-demand area owns an OnDemand: a notifier over its source's
// backing offsets, whose callback drops the area's translations from every
// domain, and a `filled` flag saying whether the domains hold them. The
// domains' translations are (re)installed when the memory is present: at map
// time, at attach, and on a DMA miss (domain::MissResolver), each time under
// the notifier's read_begin / read_retry protocol, so an invalidation that
// races with the fill wins.
#pragma once

#include <memory>

#include "domain/soft_domain_impl.hpp"
#include "iomm/notifier.hpp"
#include "sync/ranked_mutex.hpp"

namespace iomm::ioas {

struct Area;
struct IoasState;

struct OnDemand {
  // Serialises fills with the invalidation callback (lock order: after
  // tree_mu).
  sync::RankedMutex mu{sync::LockRank::on_demand_fill, "ioas::OnDemand::mu"};
  bool filled = false;  // mu: every attached domain translates the whole area
  // Over the area's source range; destroyed (waiting for a running
  // callback) before the area's translations are removed for good.
  std::unique_ptr<IntervalNotifier> watch;
};

// Register the area's notifier (no lock held). ENOMEM.
Status watch_on_demand(IoasState& st, Area& area);

enum class Fill {
  installed,  // every listed domain, and extra, translate the area
  absent,     // memory not present or being invalidated: nothing changed
  failed,     // a page table could not grow (ENOMEM): nothing changed
};

// Install the area's translations in every attached domain that lacks them,
// and in `extra` (a domain being attached, not yet listed), if the memory is
// present and no invalidation of it is in progress. domains_mu held (either
// mode); the area is live or being created. `blocking`: may wait for the
// fill lock (not inside an RCU read section).
Fill fill_on_demand(IoasState& st, Area& area, domain::PageTable* extra, bool blocking) noexcept;

// The DMA-miss resolver of an IOAS's domains: fills the on-demand area
// holding iova. Runs inside the DMA's RCU read section, so it only
// try-locks: a miss that meets a map, unmap, attach or detach of the same
// IOAS in progress faults.
class OnDemandResolver final : public domain::MissResolver {
 public:
  explicit OnDemandResolver(IoasState& st) : st_(st) {}
  bool resolve(uint64_t iova) noexcept override;

 private:
  IoasState& st_;
};

}  // namespace iomm::ioas
