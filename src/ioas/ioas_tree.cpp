// Queries over an IOAS's areas, reservations and allowed ranges, and IOVA
// allocation. The caller holds tree_mu.
#include <algorithm>
#include <bit>
#include <string>

#include "ioas/ioas_state.hpp"

namespace iomm::ioas {

uint64_t IoasState::iova_alignment() const noexcept {
  return std::max(
      {domain_alignment, external_alignment, access_count > 0 ? kPageSize : uint64_t{1}});
}

std::map<uint64_t, std::shared_ptr<Area>>::const_iterator IoasState::first_overlap(
    const IovaRange& r) const {
  auto it = areas.upper_bound(r.start);
  if (it != areas.begin() && std::prev(it)->second->range.last >= r.start) return std::prev(it);
  if (it != areas.end() && it->first <= r.last) return it;
  return areas.end();
}

bool IoasState::overlaps_area(const IovaRange& r) const { return first_overlap(r) != areas.end(); }

bool IoasState::overlaps_reserved(const IovaRange& r) const {
  return std::any_of(reserved.begin(), reserved.end(),
                     [&](const Reservation& res) { return res.range.overlaps(r); });
}

bool IoasState::overlaps_allowed(const IovaRange& r) const {
  return std::any_of(allowed.begin(), allowed.end(),
                     [&](const IovaRange& a) { return a.overlaps(r); });
}

bool IoasState::areas_aligned(uint64_t alignment) const {
  return std::all_of(areas.begin(), areas.end(), [&](const auto& entry) {
    const Area& a = *entry.second;
    return is_aligned(a.range.start, alignment) && is_aligned(a.length(), alignment) &&
           is_aligned(a.source.object()->dma_address(a.source.offset()), alignment);
  });
}

void IoasState::insert_reservation(const Reservation& r) {
  auto pos = std::upper_bound(reserved.begin(), reserved.end(), r.range.start,
                              [](uint64_t s, const Reservation& x) { return s < x.range.start; });
  reserved.insert(pos, r);
}

namespace {

// Smallest candidate >= pos that is aligned to `align`, or (for a backing
// address inside a page) that keeps the address's offset within its page.
bool next_candidate(uint64_t pos, uint64_t align, uint64_t page_offset, uint64_t* out) {
  if (page_offset == 0) {
    uint64_t bumped = 0;
    if (__builtin_add_overflow(pos, align - 1, &bumped)) return false;
    *out = bumped & ~(align - 1);
    return true;
  }
  uint64_t base = pos <= page_offset ? 0 : pos - page_offset;
  if (__builtin_add_overflow(base, kPageSize - 1, &base)) return false;
  base &= ~(kPageSize - 1);
  uint64_t cand = 0;
  if (__builtin_add_overflow(base, page_offset, &cand)) return false;
  if (cand < pos && __builtin_add_overflow(cand, kPageSize, &cand)) return false;
  *out = cand;
  return true;
}

}  // namespace

Result<uint64_t> IoasState::allocate_iova(uint64_t length, uint64_t address) const {
  if (length >= UINT64_MAX / 2) return Error(EOVERFLOW, "length too large to allocate an IOVA for");
  // iommufd's rule: the smaller of the length's power of two and the
  // address's lowest set bit, which keeps huge-page alignment when it can.
  uint64_t align = std::bit_ceil(length);
  if (address != 0) align = std::min(align, address & (~address + 1));
  const uint64_t page_offset = address % kPageSize;
  if (align < iova_alignment()) {
    return Error(EINVAL, "backing address alignment " + std::to_string(align) +
                             " is below the IOAS alignment " + std::to_string(iova_alignment()));
  }
  std::vector<IovaRange> spans = allowed;
  if (spans.empty()) spans.push_back({kPageSize, UINT64_MAX - kPageSize});
  for (const IovaRange& span : spans) {
    uint64_t pos = std::max<uint64_t>(span.start, 1);  // never IOVA 0
    for (;;) {
      uint64_t cand = 0;
      if (!next_candidate(pos, align, page_offset, &cand)) break;
      const auto range = make_range(cand, length);
      if (!range || range->last > span.last) break;
      uint64_t blocker_last = 0;
      bool blocked = false;
      if (auto it = first_overlap(*range); it != areas.end()) {
        blocker_last = it->second->range.last;
        blocked = true;
      }
      for (const Reservation& res : reserved) {
        if (res.range.overlaps(*range)) {
          blocker_last = std::max(blocker_last, res.range.last);
          blocked = true;
        }
      }
      if (!blocked) return cand;
      if (blocker_last == UINT64_MAX) break;
      pos = blocker_last + 1;
    }
  }
  return Error(ENOSPC, "no free IOVA range of " + std::to_string(length) + " bytes");
}

}  // namespace iomm::ioas
