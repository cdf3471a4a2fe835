// Per-page reference-counted pins of an access (see include/iomm/access.hpp).
#include <algorithm>
#include <new>
#include <vector>

#include "access/access_state.hpp"
#include "fault/inject.hpp"
#include "ioas/ioas_state.hpp"
#include "iomm/access.hpp"

namespace iomm {

using access::AccessState;
using ioas::Area;
using ioas::AreaState;
using ioas::IoasState;

namespace access {

namespace {

constexpr unsigned kChunkBits = 12 + AccessState::kChunkShift;

// The area containing iova (tree_mu held), or nullptr.
const Area* area_at(const IoasState& st, uint64_t iova) {
  auto it = st.areas.upper_bound(iova);
  if (it == st.areas.begin()) return nullptr;
  --it;
  return it->second->range.last >= iova ? it->second.get() : nullptr;
}

// Release the backing pin of one page whose count fell to zero.
void release_page(const Area& a, uint64_t iova) noexcept {
  a.source.object()->unpin(a.owner.get(), a.backing_offset(iova), kPageSize);
  a.access_pins.fetch_sub(1, std::memory_order_release);
}

}  // namespace

bool AccessState::page_pins_overlap(const IovaRange& r) const {
  std::lock_guard lk(page_mu);
  auto it = page_chunks.lower_bound(r.start >> kChunkBits);
  for (; it != page_chunks.end() && (it->first << kChunkBits) <= r.last; ++it) {
    for (unsigned i = 0; i < kChunkPages; ++i) {
      const uint64_t iova = (it->first << kChunkBits) + (uint64_t{i} << kPageShift);
      if (it->second.refs[i] != 0 && iova + kPageSize - 1 >= r.start && iova <= r.last) {
        return true;
      }
    }
  }
  return false;
}

void release_all_page_pins(AccessState& a) noexcept {
  std::lock_guard lk(a.page_mu);
  if (a.page_chunks.empty()) return;
  IoasState& st = ioas::state_of(*a.ioas);
  std::shared_lock tree(st.tree_mu);
  for (const auto& [key, chunk] : a.page_chunks) {
    for (unsigned i = 0; i < AccessState::kChunkPages; ++i) {
      if (chunk.refs[i] == 0) continue;
      const uint64_t iova = (key << kChunkBits) + (uint64_t{i} << kPageShift);
      if (const Area* area = area_at(st, iova)) release_page(*area, iova);
    }
  }
  a.page_chunks.clear();
  a.page_pins.store(0, std::memory_order_release);
}

void collect_pinned(const AccessState& a, uint64_t first_page, uint64_t npages,
                    std::span<uint64_t> out) {
  if (npages == 0) return;
  const uint64_t last_page = first_page + npages - 1;
  auto set = [&](uint64_t page) {
    if (page < first_page || page > last_page) return;
    const uint64_t i = page - first_page;
    if ((i >> 6) < out.size()) out[i >> 6] |= uint64_t{1} << (i & 63);
  };
  {
    std::lock_guard lk(a.mu);
    for (const auto& [iova, record] : a.pins) {
      const uint64_t p0 = iova >> kPageShift;
      const uint64_t p1 = (iova + record.length - 1) >> kPageShift;
      for (uint64_t p = std::max(p0, first_page); p <= std::min(p1, last_page); ++p) set(p);
    }
  }
  std::lock_guard lk(a.page_mu);
  auto it = a.page_chunks.lower_bound(first_page >> AccessState::kChunkShift);
  for (; it != a.page_chunks.end() && (it->first << AccessState::kChunkShift) <= last_page; ++it) {
    for (unsigned i = 0; i < AccessState::kChunkPages; ++i) {
      if (it->second.refs[i] != 0) set((it->first << AccessState::kChunkShift) + i);
    }
  }
}

}  // namespace access

// Three steps, so that page_mu (which unmap notification and dirty reads
// take) is never held while pages are locked:
// 1. Under page_mu and tree_mu (shared): check every page, raise the count of
//    pages already pinned, and for pages at count 0 raise their area's
//    access_pins and pins_in_flight. Hold each chunk touched busy so a
//    concurrent unpin cannot erase it.
// 2. Without locks: pin the pages that were at count 0.
// 3. Under page_mu: commit (a page another call pinned meanwhile keeps that
//    pin and ours is dropped) or undo, and release the chunks.
Status Access::pin_pages(uint64_t iova, uint64_t npages, uint32_t prot, void** host) {
  if (npages == 0) return Error(EINVAL, "zero pages");
  if (host == nullptr) return Error(EINVAL, "no array for the host addresses");
  if (!is_aligned(iova, kPageSize)) return Error(EINVAL, "iova must be page aligned");
  if ((prot & ~(kProtRead | kProtWrite)) != 0 || prot == 0) return Error(EINVAL, "bad prot");
  if (npages > (UINT64_MAX >> kPageShift) || !make_range(iova, npages << kPageShift)) {
    return Error(EOVERFLOW, "iova + length wraps");
  }
  AccessState& as = *state_;
  IoasState& st = ioas::state_of(*as.ioas);
  // Lands (unlinks) once step 3 has committed or undone the counts.
  const access::Flight flight(as, {iova, iova + (npages << kPageShift) - 1});

  auto page_iova = [&](uint64_t i) { return iova + (i << kPageShift); };
  auto ref_of = [&](uint64_t i) -> uint32_t& {
    const uint64_t key = page_iova(i) >> access::kChunkBits;
    return as.page_chunks.find(key)
        ->second.refs[(page_iova(i) >> kPageShift) & (AccessState::kChunkPages - 1)];
  };
  std::vector<const Area*> areas;  // per page
  std::vector<uint8_t> fresh;      // per page: at count 0 when checked, pinned by this call
  std::vector<uint64_t> busy;      // keys of the chunks this call holds busy
  uint64_t fresh_count = 0;
  uint64_t checked = 0;  // pages counted in step 1
  auto release_busy = [&] {
    for (uint64_t key : busy) {
      auto it = as.page_chunks.find(key);
      --it->second.busy;
      if (it->second.idle()) as.page_chunks.erase(it);
    }
  };
  // Undo step 1 for pages [0, checked), page_mu held. No page reaches count
  // 0 here, because nothing else changed the counts since step 1.
  auto undo_checked = [&] {
    for (uint64_t i = 0; i < checked; ++i) {
      if (fresh[i] != 0) {
        areas[i]->access_pins.fetch_sub(1, std::memory_order_release);
        areas[i]->pins_in_flight.fetch_sub(1, std::memory_order_release);
      } else {
        --ref_of(i);
      }
    }
    release_busy();
    if (fresh_count != 0) st.note_flight_exit();
  };

  std::unique_lock pl(as.page_mu);
  try {
    if (IOMM_INJECT("access.alloc_page_pins")) throw std::bad_alloc();
    areas.resize(npages);
    fresh.resize(npages);
    busy.reserve(((npages + AccessState::kChunkPages - 1) >> AccessState::kChunkShift) + 1);
    std::shared_lock tree(st.tree_mu);
    const Area* a = nullptr;
    for (; checked < npages; ++checked) {
      const uint64_t at = page_iova(checked);
      if (a == nullptr || at > a->range.last) {
        a = access::area_at(st, at);
        Status bad;
        if (a == nullptr || a->state == AreaState::filling) {
          bad = Error(ENOENT, "page is not mapped");
        } else if (a->state == AreaState::removing) {
          bad = Error(EINVAL, "range is being unmapped");
        } else if (a->host_invalid) {
          bad = Error(EBUSY, "the host address of the range is being updated");
        } else if (a->demand != nullptr) {
          bad = Error(EINVAL, "an on-demand mapping cannot be pinned");
        } else if ((a->prot & prot) != prot) {
          bad = Error(EPERM, "mapping does not allow this access");
        } else if (a->source.object()->synthetic()) {
          bad = Error(ENXIO, "no memory behind a simulated mapping");
        }
        if (!bad) {
          undo_checked();
          return bad;
        }
      }
      areas[checked] = a;
      const uint64_t key = at >> access::kChunkBits;
      if (busy.empty() || busy.back() != key) {
        auto chunk = as.page_chunks.try_emplace(key).first;
        ++chunk->second.busy;
        busy.push_back(key);  // within the reserved capacity
      }
      uint32_t& ref = ref_of(checked);
      if (ref == 0) {
        fresh[checked] = 1;
        ++fresh_count;
        a->access_pins.fetch_add(1, std::memory_order_acq_rel);
        a->pins_in_flight.fetch_add(1, std::memory_order_acq_rel);
      } else {
        ++ref;
      }
    }
  } catch (const std::bad_alloc&) {
    undo_checked();
    return Error(ENOMEM, "out of memory");
  }
  pl.unlock();

  // Step 2. The areas are held by the access_pins raised above.
  uint64_t done = 0;
  Status result;
  for (; done < npages && result; ++done) {
    if (fresh[done] == 0) continue;
    const Area& a = *areas[done];
    result = a.source.object()->pin(a.owner.get(), a.backing_offset(page_iova(done)), kPageSize,
                                    (prot & kProtWrite) != 0);
    if (!result) break;
  }

  // Step 3.
  pl.lock();
  uint64_t counted = 0;  // pages whose count this call took from 0
  for (uint64_t i = 0; i < npages; ++i) {
    const Area& a = *areas[i];
    uint32_t& ref = ref_of(i);
    if (fresh[i] == 0) {
      if (result) continue;
      // Another call may have dropped its own count meanwhile.
      if (--ref == 0) {
        access::release_page(a, page_iova(i));
        as.page_pins.fetch_sub(1, std::memory_order_acq_rel);
      }
      continue;
    }
    a.pins_in_flight.fetch_sub(1, std::memory_order_acq_rel);
    if (!result) {
      if (i < done) {
        access::release_page(a, page_iova(i));
      } else {
        a.access_pins.fetch_sub(1, std::memory_order_release);
      }
    } else if (ref++ == 0) {
      ++counted;
    } else {
      access::release_page(a, page_iova(i));  // pinned by another call meanwhile
    }
  }
  if (result) {
    for (uint64_t i = 0; i < npages; ++i) {
      host[i] = areas[i]->source.object()->host(areas[i]->backing_offset(page_iova(i)));
    }
    as.page_pins.fetch_add(counted, std::memory_order_acq_rel);
  }
  release_busy();
  pl.unlock();
  if (fresh_count != 0) st.note_flight_exit();
  return result;
}

Status Access::unpin_pages(uint64_t iova, uint64_t npages) {
  if (npages == 0) return Error(EINVAL, "zero pages");
  if (!is_aligned(iova, kPageSize)) return Error(EINVAL, "iova must be page aligned");
  if (npages > (UINT64_MAX >> kPageShift) || !make_range(iova, npages << kPageShift)) {
    return Error(EOVERFLOW, "iova + length wraps");
  }
  AccessState& as = *state_;
  std::lock_guard pl(as.page_mu);
  // Check every page first: all-or-nothing.
  {
    auto chunk = as.page_chunks.end();
    for (uint64_t i = 0; i < npages; ++i) {
      const uint64_t page_iova = iova + (i << kPageShift);
      const uint64_t key = page_iova >> access::kChunkBits;
      if (chunk == as.page_chunks.end() || chunk->first != key) chunk = as.page_chunks.find(key);
      if (chunk == as.page_chunks.end() ||
          chunk->second.refs[(page_iova >> kPageShift) & (AccessState::kChunkPages - 1)] == 0) {
        return Error(EINVAL, "page is not pinned");
      }
    }
  }
  IoasState& st = ioas::state_of(*as.ioas);
  std::shared_lock tree(st.tree_mu);
  auto chunk = as.page_chunks.end();
  const Area* a = nullptr;
  uint64_t released = 0;
  for (uint64_t i = 0; i < npages; ++i) {
    const uint64_t page_iova = iova + (i << kPageShift);
    const uint64_t key = page_iova >> access::kChunkBits;
    if (chunk == as.page_chunks.end() || chunk->first != key) chunk = as.page_chunks.find(key);
    uint32_t& ref = chunk->second.refs[(page_iova >> kPageShift) & (AccessState::kChunkPages - 1)];
    if (--ref != 0) continue;
    if (a == nullptr || page_iova < a->range.start || page_iova > a->range.last) {
      a = access::area_at(st, page_iova);
    }
    if (a != nullptr) access::release_page(*a, page_iova);
    ++released;
    if (chunk->second.idle()) {
      as.page_chunks.erase(chunk);
      chunk = as.page_chunks.end();
    }
  }
  as.page_pins.fetch_sub(released, std::memory_order_acq_rel);
  return {};
}

uint64_t Access::page_pinned_count() const {
  return state_->page_pins.load(std::memory_order_acquire);
}

}  // namespace iomm
