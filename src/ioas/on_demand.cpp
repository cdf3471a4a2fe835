// On-demand mappings: filling and dropping their translations (see
// ioas/on_demand.hpp).
#include "ioas/on_demand.hpp"

#include <mutex>
#include <shared_mutex>

#include "domain/soft_domain_impl.hpp"
#include "ioas/ioas_state.hpp"
#include "notify/notifier_state.hpp"

namespace iomm::ioas {

namespace {

// The notifier's callback: the area's memory (or part of it) is going or
// gone. Drop the whole area's translations from every domain; the next DMA
// miss fills them again if the memory is back. No grace period here (a
// DMA thread may be the invalidating thread, in a guarded copy that found
// the memory gone): a DMA that translated before the leaves went copies
// with guarded copies, which turn vanished memory into EFAULT.
bool drop_translations(IoasState& st, Area& area, IntervalNotifier& n, const Invalidation& inv,
                       uint64_t seq) noexcept {
  std::shared_lock domains(st.domains_mu, std::defer_lock);
  std::unique_lock fill(area.demand->mu, std::defer_lock);
  if (inv.blocking) {
    domains.lock();
    fill.lock();
  } else if (!domains.try_lock() || !fill.try_lock()) {
    return false;  // an attach, detach or fill holds them: retry blocking
  }
  n.set_seq(seq);
  if (area.demand->filled) {
    for (const auto& d : st.domains) {
      domain::page_table_of(*d).unmap_keeping_tables(area.range.start, area.length());
    }
    area.demand->filled = false;
  }
  return true;
}

}  // namespace

Status watch_on_demand(IoasState& st, Area& area) {
  auto watch = IntervalNotifier::watch_source(
      area.source, [&st, &area](IntervalNotifier& n, const Invalidation& inv, uint64_t seq) {
        return drop_translations(st, area, n, inv, seq);
      });
  if (!watch.ok()) return watch.error();
  area.demand->watch = std::move(watch).value();
  return {};
}

Fill fill_on_demand(IoasState& st, Area& area, domain::PageTable* extra, bool blocking) noexcept {
  OnDemand& od = *area.demand;
  notify::Node& node = od.watch->state().node;
  // Sequence first, then the probe: an invalidation after the probe makes
  // read_retry true below, under the lock its callback takes.
  const std::optional<uint64_t> seq = node.registry->try_read_begin(node);
  if (!seq) return Fill::absent;
  if (!area.source.object()->present(area.source.offset(), area.length())) return Fill::absent;
  std::unique_lock fill(od.mu, std::defer_lock);
  if (blocking) {
    fill.lock();
  } else if (!fill.try_lock()) {
    return Fill::absent;
  }
  if (od.watch->read_retry(*seq)) return Fill::absent;
  const uint64_t address = area.source.object()->dma_address(area.source.offset());
  const mem::HostAccess how = area.source.object()->host_access();
  auto map_into = [&](domain::PageTable& pt) {
    return pt.map(area.range.start, address, area.length(), area.prot, how);
  };
  Status s;
  size_t mapped = 0;
  if (!od.filled) {
    for (; mapped < st.domains.size(); ++mapped) {
      if (s = map_into(domain::page_table_of(*st.domains[mapped])); !s) break;
    }
  }
  if (s && extra != nullptr) s = map_into(*extra);
  if (!s) {
    // map() undid itself; take back the domains filled before it (their
    // tables stay, so the next fill needs no allocation there).
    for (size_t i = 0; i < mapped; ++i) {
      domain::page_table_of(*st.domains[i]).unmap_keeping_tables(area.range.start, area.length());
    }
    return Fill::failed;
  }
  od.filled = true;
  return Fill::installed;
}

bool OnDemandResolver::resolve(uint64_t iova) noexcept {
  std::shared_lock domains(st_.domains_mu, std::try_to_lock);
  if (!domains.owns_lock()) return false;
  std::shared_lock tree(st_.tree_mu, std::try_to_lock);
  if (!tree.owns_lock()) return false;
  const auto it = st_.first_overlap({iova, iova});
  if (it == st_.areas.end()) return false;
  Area& area = *it->second;
  // Removing areas are never filled again; filling ones are being filled.
  if (area.demand == nullptr || area.state != AreaState::live) return false;
  return fill_on_demand(st_, area, nullptr, false) == Fill::installed;
}

}  // namespace iomm::ioas
