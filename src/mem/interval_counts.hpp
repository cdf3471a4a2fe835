// Reference counts over ranges of page indices, stored as non-overlapping
// segments [first, last] -> count. Used for physical pins (one count per
// backing page) and for charges (one count per owner and backing page).
//
// Segments are split but never merged: a range that was incremented keeps its
// boundaries while its count is non-zero, so decrementing it again never needs
// to allocate (destroy paths cannot fail). Segments that fall to zero are
// erased by the caller once any pending work on them is done.
#pragma once

#include <cstdint>
#include <map>

namespace iomm::mem {

struct Segment {
  uint64_t last;
  uint64_t count;
  // Non-zero while a pin or unpin that moved this segment across zero is
  // doing its syscalls without the lock; others touching it wait.
  uint64_t pending_op;
};

class IntervalCounts {
 public:
  using Map = std::map<uint64_t, Segment>;

  // Make segments start at `first` and end at `last` so that [first, last] is
  // covered by whole segments (gaps become zero-count segments). May throw
  // std::bad_alloc; on throw nothing observable changed.
  void cover(uint64_t first, uint64_t last);

  // Pages in [first, last] whose count is zero. The range must be covered.
  [[nodiscard]] uint64_t zero_pages(uint64_t first, uint64_t last) const;
  [[nodiscard]] bool any_pending(uint64_t first, uint64_t last) const;

  // Add delta (+1 or -1) to every segment of the covered range. Segments that
  // cross zero (0->1 for +1, 1->0 for -1) get pending_op = op when op != 0.
  // Returns the number of pages that crossed zero.
  uint64_t add(uint64_t first, uint64_t last, int delta, uint64_t op) noexcept;

  // Erase zero-count, non-pending segments in [first, last].
  void erase_zeros(uint64_t first, uint64_t last) noexcept;

  [[nodiscard]] bool empty() const noexcept { return map_.empty(); }
  [[nodiscard]] const Map& segments() const noexcept { return map_; }
  Map& segments() noexcept { return map_; }

  // Iterator to the segment containing page, or end().
  [[nodiscard]] Map::const_iterator find(uint64_t page) const;

 private:
  void split_at(uint64_t page);
  Map map_;
};

}  // namespace iomm::mem
