// Reference counts per page index for pins taken and dropped page by page
// (an access's per-page pins, and the pin store's side of them).
//
// Stored in blocks of 512 indices: a bit per index whose count is non-zero,
// and an array of 512 counts only while some index of the block is above 1.
// A block costs one allocation of 128 bytes, so a page pinned once costs a
// quarter of a byte when its neighbours are pinned too and 128 bytes when it
// is alone in its block.
//
// Counts are only ever raised in a range that prepare() made ready, so
// raising cannot fail; lowering never allocates (it frees a count array or a
// block that is no longer needed). Not thread-safe: the owner's lock guards
// it, including the const members (they move a lookup cache).
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>

namespace iomm::mem {

class PageCounts {
 public:
  static constexpr unsigned kBlockShift = 9;
  static constexpr uint64_t kBlockSize = uint64_t{1} << kBlockShift;

  PageCounts() = default;
  PageCounts(const PageCounts&) = delete;
  PageCounts& operator=(const PageCounts&) = delete;

  // Make add() of up to `delta` to every index in [first, last] need no
  // allocation: the blocks exist, and a block gets its count array when an
  // index in the range is non-zero or delta > 1. May throw std::bad_alloc;
  // blocks it created are then erased again.
  void prepare(uint64_t first, uint64_t last, uint32_t delta = 1);
  // Erase the blocks in [first, last] that hold nothing and are not busy
  // (after a prepare whose counts were not raised after all).
  void trim(uint64_t first, uint64_t last) noexcept;

  [[nodiscard]] uint32_t get(uint64_t index) const noexcept;
  // Raise index by delta (prepared); returns the count before.
  uint32_t add(uint64_t index, uint32_t delta = 1) noexcept;
  // Lower index by delta (it must hold at least that); returns the count
  // after. A block left with no count and not busy is freed.
  uint32_t sub(uint64_t index, uint32_t delta = 1) noexcept;

  // Whole runs at once, a 64-bit word of the bitmap at a time where a block
  // has no count array (every count in it is 0 or 1).
  // Raise every index in [first, last] by delta > 0 (prepared); returns how
  // many of them were zero.
  uint64_t add_range(uint64_t first, uint64_t last, uint32_t delta = 1) noexcept;
  // Lower every index in [first, last] by delta > 0 (each holds at least
  // that); calls zeroed(lo, hi) for each maximal run of indices that fell to
  // zero, in order, and returns how many did. Blocks left with no count and
  // not busy are freed; never allocates. zeroed must not change the counts.
  template <typename F>
  uint64_t sub_range(uint64_t first, uint64_t last, uint32_t delta, F&& zeroed) noexcept;
  uint64_t sub_range(uint64_t first, uint64_t last, uint32_t delta = 1) noexcept {
    return sub_range(first, last, delta, [](uint64_t, uint64_t) {});
  }
  [[nodiscard]] uint64_t count_nonzero(uint64_t first, uint64_t last) const noexcept;

  // Keep the blocks of [first, last] (prepared) from being freed while a
  // caller works on them without the owner's lock, or let them go again.
  void hold_blocks(uint64_t first, uint64_t last) noexcept;
  void release_blocks(uint64_t first, uint64_t last) noexcept;

  // Call f(index) for every index in [first, last] with a non-zero count,
  // in order. f must not change the counts.
  template <typename F>
  void for_each_nonzero(uint64_t first, uint64_t last, F&& f) const;
  [[nodiscard]] bool any_nonzero(uint64_t first, uint64_t last) const;
  // The first index in [from, last] whose count is (want_zero ? zero :
  // non-zero), or last + 1 (so last must be below UINT64_MAX).
  [[nodiscard]] uint64_t next(uint64_t from, uint64_t last, bool want_zero) const noexcept {
    return next_count(from, last, 0, want_zero);
  }
  // The first index in [from, last] whose count is (equal ? == : !=) value,
  // or last + 1 (so last must be below UINT64_MAX).
  [[nodiscard]] uint64_t next_count(uint64_t from, uint64_t last, uint32_t value,
                                    bool equal) const noexcept;

  [[nodiscard]] bool empty() const noexcept { return blocks_.empty(); }
  void clear() noexcept {
    blocks_.clear();
    cache_ = blocks_.end();
  }

 private:
  static constexpr unsigned kWords = kBlockSize / 64;
  struct Block {
    uint64_t bits[kWords] = {};
    std::unique_ptr<uint32_t[]> counts;  // all counts while some count > 1
    uint32_t above_one = 0;              // indices whose count is > 1
    uint32_t busy = 0;
    [[nodiscard]] bool idle() const noexcept;
  };
  using Map = std::map<uint64_t, Block>;

  Block* find(uint64_t key) const noexcept;
  void erase_if_idle(Map::iterator it) noexcept;
  // sub_range() within block key, in-block indices [lo, hi]: sets in
  // zeroed[] the bits of the indices that fell to zero, returns how many
  // did, and frees the block if it is left idle.
  uint64_t sub_in_block(uint64_t key, unsigned lo, unsigned hi, uint32_t delta,
                        uint64_t (&zeroed)[kWords]) noexcept;

  Map blocks_;
  mutable Map::iterator cache_ = blocks_.end();
};

template <typename F>
void PageCounts::for_each_nonzero(uint64_t first, uint64_t last, F&& f) const {
  for (auto it = blocks_.lower_bound(first >> kBlockShift);
       it != blocks_.end() && (it->first << kBlockShift) <= last; ++it) {
    const uint64_t base = it->first << kBlockShift;
    for (unsigned w = 0; w < kWords; ++w) {
      uint64_t bits = it->second.bits[w];
      while (bits != 0) {
        const uint64_t index = base + w * 64 + static_cast<unsigned>(__builtin_ctzll(bits));
        bits &= bits - 1;
        if (index > last) return;
        if (index >= first) f(index);
      }
    }
  }
}

template <typename F>
uint64_t PageCounts::sub_range(uint64_t first, uint64_t last, uint32_t delta, F&& zeroed) noexcept {
  uint64_t total = 0;
  uint64_t run_lo = 0;
  uint64_t run_len = 0;  // a run of zeroed indices not yet reported
  for (uint64_t key = first >> kBlockShift;; ++key) {
    const uint64_t base = key << kBlockShift;
    const auto lo = static_cast<unsigned>(std::max(first, base) - base);
    const auto hi = static_cast<unsigned>(std::min(last, base + kBlockSize - 1) - base);
    uint64_t bits[kWords] = {};
    const uint64_t n = sub_in_block(key, lo, hi, delta, bits);
    total += n;
    for (unsigned w = lo / 64; n != 0 && w <= hi / 64; ++w) {
      for (uint64_t m = bits[w]; m != 0;) {
        const auto start = static_cast<unsigned>(__builtin_ctzll(m));
        const uint64_t rest = ~(m >> start);  // zero only for a full word
        const unsigned len = rest == 0 ? 64 : static_cast<unsigned>(__builtin_ctzll(rest));
        const uint64_t at = base + w * 64 + start;
        if (run_len != 0 && run_lo + run_len == at) {
          run_len += len;
        } else {
          if (run_len != 0) zeroed(run_lo, run_lo + run_len - 1);
          run_lo = at;
          run_len = len;
        }
        m = len == 64 ? 0 : m & ~(((uint64_t{1} << len) - 1) << start);
      }
    }
    if (key == last >> kBlockShift) break;
  }
  if (run_len != 0) zeroed(run_lo, run_lo + run_len - 1);
  return total;
}

}  // namespace iomm::mem
