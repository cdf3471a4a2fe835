// Attaching external domains, and mapping the IOAS's areas into them (see
// include/iomm/external_domain.hpp and src/ioas/external.hpp).
#include <algorithm>
#include <string>

#include "ioas/external.hpp"
#include "ioas/ioas_state.hpp"
#include "iomm/ioas.hpp"

namespace iomm {

using ioas::Area;
using ioas::AreaState;
using ioas::IoasState;

namespace {

void* host_of(const Area& a) { return a.source.object()->host(a.source.offset()); }

// Map every area into d; all or nothing.
Status map_into(ExternalDomain& d, const std::vector<std::shared_ptr<Area>>& areas) {
  for (size_t i = 0; i < areas.size(); ++i) {
    const Area& a = *areas[i];
    if (Status s = d.map(a.range.start, host_of(a), a.length(), a.prot); !s) {
      for (size_t j = 0; j < i; ++j) d.unmap(areas[j]->range.start, areas[j]->length());
      return s;
    }
  }
  return {};
}

// The IOVA space outside `usable` (sorted, disjoint).
std::vector<IovaRange> complement(const std::vector<IovaRange>& usable) {
  std::vector<IovaRange> out;
  uint64_t next = 0;
  for (const IovaRange& r : usable) {
    if (r.start > next) out.push_back({next, r.start - 1});
    if (r.last == UINT64_MAX) return out;
    next = r.last + 1;
  }
  out.push_back({next, UINT64_MAX});
  return out;
}

// Drop d's reservations and recompute the external alignment from the
// domains still listed. tree_mu held exclusively; allocates nothing.
void forget_external(IoasState& st, const ExternalDomain* d) noexcept {
  std::erase_if(st.reserved, [&](const ioas::Reservation& r) { return r.owner == d; });
  st.external_alignment = 1;
  for (const auto& slot : st.external) {
    if (slot.domain.get() != d)
      st.external_alignment = std::max(st.external_alignment, slot.page_size);
  }
}

}  // namespace

namespace ioas {

Status map_external(const IoasState& st, const std::vector<std::shared_ptr<Area>>& areas) {
  for (size_t d = 0; d < st.external.size(); ++d) {
    if (Status s = map_into(*st.external[d].domain, areas); !s) {
      for (size_t e = 0; e < d; ++e) {
        for (const auto& a : areas) st.external[e].domain->unmap(a->range.start, a->length());
      }
      return s;
    }
  }
  return {};
}

void unmap_external(const IoasState& st, const Area& area) noexcept {
  for (const auto& slot : st.external) slot.domain->unmap(area.range.start, area.length());
}

}  // namespace ioas

Status Ioas::attach_external(const std::shared_ptr<ExternalDomain>& domain) {
  if (!domain) return Error(EINVAL, "no domain");
  IoasState& st = *state_;
  auto geometry = domain->geometry();
  if (!geometry) return geometry.error();
  const uint64_t page = geometry->min_page_size;
  if (page == 0 || (page & (page - 1)) != 0) {
    return Error(EINVAL,
                 "the domain's page size " + std::to_string(page) + " is not a power of two");
  }
  // Exclusive: no fill runs until the domain is listed or refused, so every
  // area is either mapped here now or fills into it later.
  std::unique_lock domains(st.domains_mu);
  for (const auto& slot : st.external) {
    if (slot.domain == domain) return Error(EINVAL, "domain is already attached to this IOAS");
  }
  std::vector<std::shared_ptr<Area>> live;
  try {
    const std::vector<IovaRange> reservations = complement(geometry->usable);
    std::unique_lock tree(st.tree_mu);
    for (const IovaRange& r : reservations) {
      if (st.overlaps_area(r)) {
        return Error(EADDRINUSE, "a mapping lies outside the domain's usable IOVA ranges");
      }
      if (st.overlaps_allowed(r)) {
        return Error(EADDRINUSE, "an allowed IOVA range lies outside the domain's usable ranges");
      }
    }
    if (!st.areas_aligned(std::max(page, st.iova_alignment()))) {
      return Error(EADDRINUSE,
                   "a mapping is not aligned to the domain's page size " + std::to_string(page));
    }
    for (const auto& [start, a] : st.areas) {
      if (a->state == AreaState::live) live.push_back(a);
    }
    st.external.reserve(st.external.size() + 1);
    st.reserved.reserve(st.reserved.size() + reservations.size());
    for (const IovaRange& r : reservations) st.insert_reservation({r, domain.get()});
    st.external_alignment = std::max(st.external_alignment, page);
  } catch (const std::bad_alloc&) {
    std::unique_lock tree(st.tree_mu);
    forget_external(st, domain.get());
    return Error(ENOMEM, "out of memory");
  }
  // The domain pins as it maps: outside the tree lock.
  if (Status s = map_into(*domain, live); !s) {
    std::unique_lock tree(st.tree_mu);
    forget_external(st, domain.get());
    return s;
  }
  st.external.push_back({domain, page});  // capacity reserved above
  return {};
}

Status Ioas::detach_external(const std::shared_ptr<ExternalDomain>& domain) {
  IoasState& st = *state_;
  std::unique_lock domains(st.domains_mu);
  auto it = std::find_if(st.external.begin(), st.external.end(),
                         [&](const IoasState::ExternalSlot& s) { return s.domain == domain; });
  if (it == st.external.end()) return Error(ENOENT, "domain is not attached to this IOAS");
  st.external.erase(it);
  {
    // Areas in any state: one being removed may not have reached its unmap
    // from the domains yet (unmapping what is not mapped is harmless). No
    // fill runs (domains_mu exclusive), so no area gains a mapping here.
    std::shared_lock tree(st.tree_mu);
    for (const auto& [start, a] : st.areas) domain->unmap(start, a->length());
  }
  std::unique_lock tree(st.tree_mu);
  forget_external(st, domain.get());
  return {};
}

}  // namespace iomm
