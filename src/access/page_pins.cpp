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
  IoasState& st = a.ioas->state();
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

Status Access::pin_pages(uint64_t iova, uint64_t npages, uint32_t prot, void** host) {
  if (npages == 0) return Error(EINVAL, "zero pages");
  if (host == nullptr) return Error(EINVAL, "no array for the host addresses");
  if (!is_aligned(iova, kPageSize)) return Error(EINVAL, "iova must be page aligned");
  if ((prot & ~(kProtRead | kProtWrite)) != 0 || prot == 0) return Error(EINVAL, "bad prot");
  if (npages > (UINT64_MAX >> kPageShift) || !make_range(iova, npages << kPageShift)) {
    return Error(EOVERFLOW, "iova + length wraps");
  }
  AccessState& as = *state_;
  IoasState& st = as.ioas->state();
  as.pins_in_flight.fetch_add(1, std::memory_order_acq_rel);
  struct InFlight {
    AccessState& s;
    ~InFlight() { s.pins_in_flight.fetch_sub(1, std::memory_order_acq_rel); }
  } in_flight{as};

  std::lock_guard pl(as.page_mu);
  // Per page: its area, and whether this call pins it anew.
  std::vector<const Area*> areas;
  std::vector<uint64_t> fresh;  // indexes of pages pinned anew
  std::vector<uint64_t> new_chunks;
  auto drop_new_chunks = [&] {
    for (uint64_t key : new_chunks) as.page_chunks.erase(key);
  };
  try {
    if (IOMM_INJECT("access.alloc_page_pins")) throw std::bad_alloc();
    areas.resize(npages);
    std::shared_lock tree(st.tree_mu);
    const Area* a = nullptr;
    auto chunk = as.page_chunks.end();
    for (uint64_t i = 0; i < npages; ++i) {
      const uint64_t page_iova = iova + (i << kPageShift);
      if (a == nullptr || page_iova > a->range.last) {
        a = access::area_at(st, page_iova);
        if (a == nullptr || a->state == AreaState::filling) {
          for (uint64_t f : fresh) areas[f]->access_pins.fetch_sub(1, std::memory_order_release);
          drop_new_chunks();
          return Error(ENOENT, "page is not mapped");
        }
        Status bad;
        if (a->state == AreaState::removing) {
          bad = Error(EINVAL, "range is being unmapped");
        } else if (a->host_invalid) {
          bad = Error(EBUSY, "the host address of the range is being updated");
        } else if ((a->prot & prot) != prot) {
          bad = Error(EPERM, "mapping does not allow this access");
        } else if (a->source.object()->synthetic()) {
          bad = Error(ENXIO, "no memory behind a simulated mapping");
        }
        if (!bad) {
          for (uint64_t f : fresh) areas[f]->access_pins.fetch_sub(1, std::memory_order_release);
          drop_new_chunks();
          return bad;
        }
      }
      areas[i] = a;
      const uint64_t key = page_iova >> access::kChunkBits;
      if (chunk == as.page_chunks.end() || chunk->first != key) {
        chunk = as.page_chunks.lower_bound(key);
        if (chunk == as.page_chunks.end() || chunk->first != key) {
          chunk = as.page_chunks.emplace_hint(chunk, key, AccessState::PageChunk{});
          new_chunks.push_back(key);
        }
      }
      if (chunk->second.refs[(page_iova >> kPageShift) & (AccessState::kChunkPages - 1)] == 0) {
        fresh.push_back(i);
        a->access_pins.fetch_add(1, std::memory_order_acq_rel);
      }
    }
  } catch (const std::bad_alloc&) {
    for (uint64_t f : fresh) areas[f]->access_pins.fetch_sub(1, std::memory_order_release);
    drop_new_chunks();
    return Error(ENOMEM, "out of memory");
  }

  // Pin the fresh pages, without the tree lock (their areas are held by
  // the access_pins raised above).
  size_t done = 0;
  Status result;
  for (; done < fresh.size(); ++done) {
    const uint64_t page_iova = iova + (fresh[done] << kPageShift);
    const Area& a = *areas[fresh[done]];
    result = a.source.object()->pin(a.owner.get(), a.backing_offset(page_iova), kPageSize,
                                    (prot & kProtWrite) != 0);
    if (!result) break;
  }
  if (!result) {
    for (size_t k = 0; k < fresh.size(); ++k) {
      const uint64_t page_iova = iova + (fresh[k] << kPageShift);
      if (k < done) {
        access::release_page(*areas[fresh[k]], page_iova);
      } else {
        areas[fresh[k]]->access_pins.fetch_sub(1, std::memory_order_release);
      }
    }
    drop_new_chunks();
    return result;
  }
  auto chunk = as.page_chunks.end();
  for (uint64_t i = 0; i < npages; ++i) {
    const uint64_t page_iova = iova + (i << kPageShift);
    const uint64_t key = page_iova >> access::kChunkBits;
    if (chunk == as.page_chunks.end() || chunk->first != key) {
      if (chunk != as.page_chunks.end() && std::next(chunk) != as.page_chunks.end() &&
          std::next(chunk)->first == key) {
        ++chunk;
      } else {
        chunk = as.page_chunks.find(key);
      }
    }
    ++chunk->second.refs[(page_iova >> kPageShift) & (AccessState::kChunkPages - 1)];
    const Area& a = *areas[i];
    host[i] = a.source.object()->host(a.backing_offset(page_iova));
  }
  as.page_pins.fetch_add(fresh.size(), std::memory_order_acq_rel);
  return {};
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
  IoasState& st = as.ioas->state();
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
    const auto& refs = chunk->second.refs;
    if (std::all_of(std::begin(refs), std::end(refs), [](uint32_t r) { return r == 0; })) {
      chunk = as.page_chunks.erase(chunk);
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
