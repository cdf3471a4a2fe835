// Attaching and detaching software domains (see include/iomm/ioas.hpp).
#include <algorithm>
#include <span>
#include <string>

#include "domain/soft_domain_impl.hpp"
#include "fault/inject.hpp"
#include "ioas/ioas_state.hpp"
#include "iomm/ioas.hpp"

namespace iomm {

using ioas::Area;
using ioas::AreaState;
using ioas::IoasState;

namespace {

std::vector<IovaRange> domain_reservations(const DomainConfig& cfg) {
  std::vector<IovaRange> out = cfg.reserved;
  if (cfg.aperture_start > 0) out.push_back({0, cfg.aperture_start - 1});
  if (cfg.aperture_last < UINT64_MAX) out.push_back({cfg.aperture_last + 1, UINT64_MAX});
  return out;
}

// Drop a domain's reservations and recompute the domain alignment from the
// domains still listed. tree_mu held exclusively.
void forget_domain(IoasState& st, const SoftDomain* d) noexcept {
  std::erase_if(st.reserved, [&](const ioas::Reservation& r) { return r.owner == d; });
  st.domain_alignment = 1;
  for (const auto& other : st.domains) {
    if (other.get() != d) {
      st.domain_alignment = std::max(st.domain_alignment, other->config().min_page_size);
    }
  }
}

}  // namespace

Status Ioas::attach(const std::shared_ptr<SoftDomain>& domain) {
  if (!domain) return Error(EINVAL, "no domain");
  const void* expected = nullptr;
  if (!domain->impl_->attached_to.compare_exchange_strong(expected, this)) {
    if (expected == this) return Error(EINVAL, "domain is already attached to this IOAS");
    return Error(EBUSY, "domain is attached to another IOAS");
  }
  IoasState& st = *state_;
  const DomainConfig& cfg = domain->config();
  std::unique_lock domains(st.domains_mu);
  std::vector<std::shared_ptr<Area>> live;
  auto release_claim = [&] { domain->impl_->attached_to.store(nullptr); };

  try {
    const std::vector<IovaRange> reservations = domain_reservations(cfg);
    std::unique_lock tree(st.tree_mu);
    // Areas in any state count: a placeholder reserved before we took the
    // domains lock will fill into this domain once we release it.
    for (const IovaRange& r : reservations) {
      if (st.overlaps_area(r)) {
        release_claim();
        return Error(EADDRINUSE,
                     "a mapping lies outside the domain's aperture or in its reserved region");
      }
      if (st.overlaps_allowed(r)) {
        release_claim();
        return Error(
            EADDRINUSE,
            "an allowed IOVA range lies outside the domain's aperture or in its reserved region");
      }
    }
    const uint64_t new_alignment = std::max(st.domain_alignment, cfg.min_page_size);
    if (!st.areas_aligned(std::max(new_alignment, st.iova_alignment()))) {
      release_claim();
      return Error(EADDRINUSE, "a mapping is not aligned to the domain's page size " +
                                   std::to_string(cfg.min_page_size));
    }
    for (const auto& [start, a] : st.areas) {
      if (a->state == AreaState::live) live.push_back(a);
    }
    if (IOMM_INJECT("ioas.alloc_reservation")) throw std::bad_alloc();
    st.reserved.reserve(st.reserved.size() + reservations.size());
    for (const IovaRange& r : reservations) st.insert_reservation({r, domain.get()});
    st.domain_alignment = new_alignment;
  } catch (const std::bad_alloc&) {
    std::unique_lock tree(st.tree_mu);
    forget_domain(st, domain.get());
    release_claim();
    return Error(ENOMEM, "out of memory");
  }

  const bool first = st.domains.empty();
  size_t pinned = 0;
  size_t mapped = 0;
  Status result;
  if (first) {
    for (; pinned < live.size(); ++pinned) {
      if (result = live[pinned]->pin_all(); !result) break;
    }
  }
  for (; result && mapped < live.size(); ++mapped) {
    Area& a = *live[mapped];
    if (a.demand != nullptr) {
      if (ioas::fill_on_demand(st, a, &domain::page_table_of(*domain), true) == ioas::Fill::failed) {
        result = Error(ENOMEM, "out of memory for the page table");
        break;
      }
      continue;
    }
    result =
        domain::page_table_of(*domain).map(a.range.start, a.source.object()->dma_address(a.source.offset()),
                                 a.length(), a.prot, a.source.object()->host_access());
    if (!result) break;
  }
  if (result) {
    try {
      if (IOMM_INJECT("ioas.alloc_domain_slot")) throw std::bad_alloc();
      st.domains.push_back(domain);
    } catch (const std::bad_alloc&) {
      result = Error(ENOMEM, "out of memory");
    }
  }
  if (!result) {
    // Up to and including the area whose map failed (its map kept the
    // tables it allocated; this unmap retires them).
    for (size_t i = 0; i < std::min(mapped + 1, live.size()); ++i) {
      domain::page_table_of(*domain).unmap(live[i]->range.start, live[i]->length());
    }
    ioas::wait_for_readers(std::span(&domain, 1));  // its DMA interface may have used them
    for (size_t i = 0; i < pinned; ++i) live[i]->unpin_all();
    std::unique_lock tree(st.tree_mu);
    forget_domain(st, domain.get());
    release_claim();
    return result;
  }
  if (first) {
    for (const auto& a : live) a->domain_pinned.store(a->demand == nullptr);
  }
  domain->impl_->dirty_log.store(&st.dirty, std::memory_order_release);
  domain->impl_->resolver.store(&st.resolver, std::memory_order_release);
  return {};
}

Status Ioas::detach(const std::shared_ptr<SoftDomain>& domain) {
  IoasState& st = *state_;
  std::unique_lock domains(st.domains_mu);
  auto it = std::find(st.domains.begin(), st.domains.end(), domain);
  if (it == st.domains.end()) return Error(ENOENT, "domain is not attached to this IOAS");
  st.domains.erase(it);
  // No allocation from here on: detaching cannot fail.
  {
    std::shared_lock tree(st.tree_mu);
    for (const auto& [start, a] : st.areas)
      domain::page_table_of(*domain).unmap(start, a->length());
  }
  domain->impl_->dirty_log.store(nullptr, std::memory_order_release);
  domain->impl_->resolver.store(nullptr, std::memory_order_release);
  ioas::wait_for_readers(std::span(&domain, 1));
  if (st.domains.empty()) {
    std::shared_lock tree(st.tree_mu);
    for (const auto& [start, a] : st.areas) {
      if (a->domain_pinned.exchange(false)) a->unpin_all();
    }
  }
  {
    std::unique_lock tree(st.tree_mu);
    forget_domain(st, domain.get());
  }
  domain->impl_->attached_to.store(nullptr);
  return {};
}

}  // namespace iomm
