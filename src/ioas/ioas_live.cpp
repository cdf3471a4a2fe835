// Dirty tracking and live update of host addresses
// (see include/iomm/ioas.hpp for the contract).
#include <algorithm>
#include <new>
#include <shared_mutex>
#include <string>

#include "access/access_state.hpp"
#include "acct/owner.hpp"
#include "core/check.hpp"
#include "domain/page_table.hpp"
#include "fault/inject.hpp"
#include "ioas/ioas_state.hpp"
#include "iomm/ioas.hpp"
#include "sync/rcu.hpp"

namespace iomm {

using ioas::Area;
using ioas::AreaState;
using ioas::IoasState;

void Ioas::set_dirty_tracking(bool on) noexcept {
  {
    // Exclusive tree_mu: unmap frees dirty-log tables under it, and access rw
    // holds it shared from its check of the flag to its last byte, so once
    // we hold it no access write that read the flag as off is still running.
    std::unique_lock tree(state_->tree_mu);
    state_->dirty.set_enabled(on);
  }
  if (!on) return;
  // Device DMA runs inside an RCU read section: wait for writers that read
  // the flag as off.
  sync::rcu_synchronize();
}

bool Ioas::dirty_tracking() const noexcept { return state_->dirty.enabled(); }

namespace {

Status read_dirty(IoasState& st, uint64_t iova, uint64_t length, std::span<uint64_t> bitmap,
                  bool clear) {
  if (!st.dirty.enabled()) return Error(EINVAL, "dirty tracking is off");
  if (length == 0) return Error(EINVAL, "zero length");
  if (!is_aligned(iova, kPageSize) || !is_aligned(length, kPageSize)) {
    return Error(EINVAL, "iova and length must be page aligned");
  }
  if (!make_range(iova, length)) return Error(EOVERFLOW, "iova + length wraps");
  const uint64_t npages = length >> kPageShift;
  if (bitmap.size() < (npages + 63) / 64) return Error(EINVAL, "bitmap too small");
  std::fill(bitmap.begin(), bitmap.end(), 0);
  {
    std::shared_lock tree(st.tree_mu);  // unmap frees dirty-log tables under it
    st.dirty.collect(iova >> kPageShift, npages, bitmap, clear);
  }
  std::lock_guard lk(st.accesses_mu);
  for (const access::AccessState* a : st.accesses) {
    access::collect_pinned(*a, iova >> kPageShift, npages, bitmap);
  }
  return {};
}

}  // namespace

Status Ioas::read_and_clear_dirty(uint64_t iova, uint64_t length, std::span<uint64_t> bitmap) {
  return read_dirty(*state_, iova, length, bitmap, true);
}

Status Ioas::peek_dirty(uint64_t iova, uint64_t length, std::span<uint64_t> bitmap) {
  return read_dirty(*state_, iova, length, bitmap, false);
}

Result<uint64_t> Ioas::invalidate_host(uint64_t iova, uint64_t length) {
  if (length == 0) return Error(EINVAL, "zero length");
  const auto r = make_range(iova, length);
  if (!r) return Error(EOVERFLOW, "iova + length wraps");
  IoasState& st = *state_;
  std::unique_lock tree(st.tree_mu);
  uint64_t bytes = 0;
  for (auto it = st.first_overlap(*r); it != st.areas.end() && it->first <= r->last; ++it) {
    const Area& a = *it->second;
    if (!r->contains(a.range)) return Error(ENOENT, "the range cuts a mapping");
    if (a.state != AreaState::live) return Error(EBUSY, "a mapping is being created or removed");
    if (a.host_invalid) return Error(EINVAL, "a mapping's host address is already invalid");
  }
  for (auto it = st.first_overlap(*r); it != st.areas.end() && it->first <= r->last; ++it) {
    it->second->host_invalid = true;
    ++st.host_invalid_areas;
    bytes += it->second->length();
  }
  return bytes;
}

uint64_t Ioas::invalid_host_count() const {
  std::shared_lock tree(state_->tree_mu);
  return state_->host_invalid_areas;
}

Status Ioas::replace_host(uint64_t iova, const MemorySource& source, const OwnerSpec& owner_spec) {
  IoasState& st = *state_;
  auto new_owner = acct::owner_for_mapping(st.options.account_mode, owner_spec);
  if (!new_owner.ok()) return new_owner.error();
  // Domains are stable while we hold domains_mu exclusively; the area cannot
  // be unmapped meanwhile because we mark it removing-proof below.
  std::unique_lock domains(st.domains_mu);
  std::shared_ptr<Area> old;
  {
    std::unique_lock tree(st.tree_mu);
    auto it = st.areas.find(iova);
    if (it == st.areas.end()) return Error(ENOENT, "no mapping starts at this IOVA");
    old = it->second;
    if (old->state != AreaState::live) return Error(EBUSY, "the mapping is being removed");
    if (!old->host_invalid) return Error(EINVAL, "the mapping's host address is valid");
    if (old->length() != source.length()) return Error(EINVAL, "length differs from the mapping");
    // As map() requires: domains and accesses rely on every area's backing
    // address fitting the IOAS's alignment.
    if (!is_aligned(source.object()->dma_address(source.offset()), st.iova_alignment())) {
      return Error(EINVAL, "the new backing address is not aligned to the IOAS's IOVA alignment");
    }
    if (old->access_pins.load(std::memory_order_acquire) != 0) {
      return Error(EBUSY, "accesses hold pins in the mapping");
    }
    // Busy while we switch it: a concurrent unmap gets EBUSY.
    old->state = AreaState::filling;
  }
  auto restore = [&] {
    std::unique_lock tree(st.tree_mu);
    old->state = AreaState::live;
  };
  if ((old->prot & kProtWrite) != 0 && !source.writable()) {
    restore();
    return Error(EPERM, "write access on a read-only source");
  }
  // Same owner counter: keep the old owner object (nothing moves).
  std::shared_ptr<acct::Owner> owner = std::move(new_owner).value();
  if (owner && old->owner && owner.get() == old->owner.get()) owner = old->owner;
  std::shared_ptr<Area> fresh;
  try {
    if (IOMM_INJECT("ioas.alloc_live_area")) throw std::bad_alloc();
    fresh = std::make_shared<Area>(old->range, source, old->prot, owner);
  } catch (const std::bad_alloc&) {
    restore();
    return Error(ENOMEM, "out of memory");
  }
  const bool pinned = old->domain_pinned.load();
  const uint64_t old_addr = old->source.object()->dma_address(old->source.offset());
  const uint64_t new_addr = source.object()->dma_address(source.offset());
  const bool same_pages =
      old->source.object() == source.object() && old->source.offset() == source.offset();
  if (!same_pages && new_addr != old_addr && !st.external.empty()) {
    restore();
    return Error(EOPNOTSUPP, "an external domain maps this memory: it cannot switch to another");
  }
  // New owner (and new pages) first: this is where ENOMEM can happen.
  if (pinned) {
    if (Status s = fresh->pin_all(); !s) {
      restore();
      return s;
    }
  }
  if (!same_pages && new_addr != old_addr) {
    for (size_t d = 0; d < st.domains.size(); ++d) {
      domain::PageTable& pt = st.domains[d]->page_table();
      pt.unmap_keeping_tables(old->range.start, old->length());
      if (Status s = pt.map(old->range.start, new_addr, old->length(), old->prot,
                            source.object()->host_access());
          !s) {
        // Put every domain back on the old pages. This cannot fail: the
        // unmaps above kept their tables, so every table the old translation
        // used is still there, and a slot the failed map turned into a
        // table takes the old pages as smaller leaves in it.
        for (size_t e = 0; e <= d; ++e) {
          domain::PageTable& back = st.domains[e]->page_table();
          back.unmap_keeping_tables(old->range.start, old->length());
          const Status restored = back.map(old->range.start, old_addr, old->length(), old->prot,
                                           old->source.object()->host_access());
          IOMM_CHECK(restored.ok(), "restoring the old translation failed");
        }
        sync::rcu_synchronize();
        if (pinned) fresh->unpin_all();
        restore();
        return s;
      }
    }
    sync::rcu_synchronize();
  }
  {
    std::unique_lock tree(st.tree_mu);
    fresh->state = AreaState::live;
    fresh->domain_pinned.store(pinned);
    st.areas[iova] = fresh;
    --st.host_invalid_areas;
  }
  // Then release the old pin (memory first, then the old owner's charge).
  if (pinned && old->domain_pinned.exchange(false)) old->unpin_all();
  return {};
}

}  // namespace iomm
