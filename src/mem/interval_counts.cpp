#include "mem/interval_counts.hpp"

#include "core/check.hpp"

namespace iomm::mem {

IntervalCounts::Map::const_iterator IntervalCounts::find(uint64_t page) const {
  auto it = map_.upper_bound(page);
  if (it == map_.begin()) return map_.end();
  --it;
  return it->second.last >= page ? it : map_.end();
}

// Ensure a segment boundary at `page` (a segment starts there if any segment
// contains it).
void IntervalCounts::split_at(uint64_t page) {
  auto it = map_.upper_bound(page);
  if (it == map_.begin()) return;
  --it;
  if (it->first == page || it->second.last < page) return;
  Segment tail = it->second;
  map_.emplace_hint(std::next(it), page, tail);
  it->second.last = page - 1;
}

void IntervalCounts::cover(uint64_t first, uint64_t last) {
  // Gap segments are built in a scratch map and spliced in last (node
  // transfer, no allocation), so a bad_alloc leaves the counts unchanged;
  // an extra boundary from a completed split is harmless.
  Map gaps;
  uint64_t pos = first;  // first page not yet known to be covered
  bool covered = false;
  auto it = map_.upper_bound(first);
  if (it != map_.begin()) {
    const Segment& prev = std::prev(it)->second;
    if (prev.last >= first) {
      covered = prev.last >= last;
      pos = covered ? last : prev.last + 1;
    }
  }
  while (!covered) {
    if (it == map_.end() || it->first > last) {
      gaps.emplace(pos, Segment{last, 0, 0});
      break;
    }
    if (it->first > pos) gaps.emplace(pos, Segment{it->first - 1, 0, 0});
    if (it->second.last >= last) break;
    pos = it->second.last + 1;
    ++it;
  }
  split_at(first);
  if (last != UINT64_MAX) split_at(last + 1);
  map_.merge(gaps);
}

uint64_t IntervalCounts::zero_pages(uint64_t first, uint64_t last) const {
  uint64_t zeros = 0;
  for (auto it = map_.lower_bound(first); it != map_.end() && it->first <= last; ++it) {
    if (it->second.count == 0) zeros += it->second.last - it->first + 1;
  }
  return zeros;
}

bool IntervalCounts::any_pending(uint64_t first, uint64_t last) const {
  auto it = map_.upper_bound(first);
  if (it != map_.begin()) --it;
  for (; it != map_.end() && it->first <= last; ++it) {
    if (it->second.last >= first && it->second.pending_op != 0) return true;
  }
  return false;
}

uint64_t IntervalCounts::add(uint64_t first, uint64_t last, int delta, uint64_t op) noexcept {
  uint64_t crossed = 0;
  for (auto it = map_.lower_bound(first); it != map_.end() && it->first <= last; ++it) {
    Segment& seg = it->second;
    IOMM_CHECK(seg.last <= last, "range not covered");
    if (delta > 0) {
      if (seg.count++ == 0) {
        crossed += seg.last - it->first + 1;
        if (op != 0) seg.pending_op = op;
      }
    } else {
      IOMM_CHECK(seg.count > 0, "pin count underflow");
      if (--seg.count == 0) {
        crossed += seg.last - it->first + 1;
        if (op != 0) seg.pending_op = op;
      }
    }
  }
  return crossed;
}

void IntervalCounts::erase_zeros(uint64_t first, uint64_t last) noexcept {
  for (auto it = map_.lower_bound(first); it != map_.end() && it->first <= last;) {
    if (it->second.count == 0 && it->second.pending_op == 0) {
      it = map_.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace iomm::mem
