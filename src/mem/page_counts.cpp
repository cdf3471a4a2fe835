#include "mem/page_counts.hpp"

#include <algorithm>
#include <new>

#include "core/check.hpp"

namespace iomm::mem {

namespace {

constexpr uint64_t kMask = PageCounts::kBlockSize - 1;

bool test_bit(const uint64_t* bits, uint64_t i) noexcept { return (bits[i >> 6] >> (i & 63)) & 1U; }

// The bits of word w that fall in the in-block indices [lo, hi].
uint64_t word_mask(unsigned w, unsigned lo, unsigned hi) noexcept {
  const unsigned from = std::max(lo, w * 64) - w * 64;
  const unsigned to = std::min(hi, w * 64 + 63) - w * 64;
  return (~uint64_t{0} >> (63 - to)) & (~uint64_t{0} << from);
}

}  // namespace

bool PageCounts::Block::idle() const noexcept {
  if (busy != 0) return false;
  for (uint64_t w : bits) {
    if (w != 0) return false;
  }
  return true;
}

PageCounts::Block* PageCounts::find(uint64_t key) const noexcept {
  if (cache_ != blocks_.end() && cache_->first == key) return &cache_->second;
  auto it = const_cast<Map&>(blocks_).find(key);
  if (it == blocks_.end()) return nullptr;
  cache_ = it;
  return &it->second;
}

void PageCounts::erase_if_idle(Map::iterator it) noexcept {
  if (!it->second.idle()) return;
  if (cache_ == it) cache_ = blocks_.end();
  blocks_.erase(it);
}

void PageCounts::prepare(uint64_t first, uint64_t last, uint32_t delta) {
  uint64_t created_first = UINT64_MAX;
  uint64_t created_last = 0;
  try {
    for (uint64_t key = first >> kBlockShift;; ++key) {
      auto [it, created] = blocks_.try_emplace(key);
      if (created) {
        created_first = std::min(created_first, key);
        created_last = key;
      }
      Block& b = it->second;
      if (!b.counts) {
        const uint64_t lo = std::max(first, key << kBlockShift) & kMask;
        const uint64_t hi = std::min(last, (key << kBlockShift) | kMask) & kMask;
        bool needed = delta > 1;
        for (uint64_t i = lo; i <= hi && !needed; ++i) needed = test_bit(b.bits, i);
        if (needed) {
          b.counts = std::make_unique<uint32_t[]>(kBlockSize);
          for (uint64_t i = 0; i < kBlockSize; ++i) b.counts[i] = test_bit(b.bits, i) ? 1 : 0;
        }
      }
      if (key == last >> kBlockShift) break;
    }
  } catch (const std::bad_alloc&) {
    if (created_first != UINT64_MAX) {
      trim(created_first << kBlockShift, (created_last << kBlockShift) | kMask);
    }
    throw;
  }
}

void PageCounts::trim(uint64_t first, uint64_t last) noexcept {
  for (auto it = blocks_.lower_bound(first >> kBlockShift);
       it != blocks_.end() && it->first <= last >> kBlockShift;) {
    auto next = std::next(it);
    if (it->second.above_one == 0) it->second.counts.reset();
    erase_if_idle(it);
    it = next;
  }
}

uint32_t PageCounts::get(uint64_t index) const noexcept {
  const Block* b = find(index >> kBlockShift);
  if (b == nullptr) return 0;
  const uint64_t i = index & kMask;
  if (b->counts) return b->counts[i];
  return test_bit(b->bits, i) ? 1 : 0;
}

uint32_t PageCounts::add(uint64_t index, uint32_t delta) noexcept {
  Block* b = find(index >> kBlockShift);
  IOMM_CHECK(b != nullptr, "page count raised outside a prepared range");
  const uint64_t i = index & kMask;
  uint32_t before;
  if (b->counts) {
    before = b->counts[i];
    IOMM_CHECK(before <= UINT32_MAX - delta, "page count overflow");
    b->counts[i] = before + delta;
    if (before <= 1 && before + delta > 1) ++b->above_one;
  } else {
    before = test_bit(b->bits, i) ? 1 : 0;
    IOMM_CHECK(before + delta == 1, "page count raised above 1 without a count array");
  }
  b->bits[i >> 6] |= uint64_t{1} << (i & 63);
  return before;
}

uint32_t PageCounts::sub(uint64_t index, uint32_t delta) noexcept {
  auto it = cache_;
  if (it == blocks_.end() || it->first != index >> kBlockShift) {
    it = blocks_.find(index >> kBlockShift);
    IOMM_CHECK(it != blocks_.end(), "page count underflow");
    cache_ = it;
  }
  Block& b = it->second;
  const uint64_t i = index & kMask;
  uint32_t after;
  if (b.counts) {
    const uint32_t before = b.counts[i];
    IOMM_CHECK(before >= delta && delta > 0, "page count underflow");
    after = before - delta;
    b.counts[i] = after;
    if (before > 1 && after <= 1 && --b.above_one == 0) b.counts.reset();
  } else {
    IOMM_CHECK(delta == 1 && test_bit(b.bits, i), "page count underflow");
    after = 0;
  }
  if (after == 0) {
    b.bits[i >> 6] &= ~(uint64_t{1} << (i & 63));
    if (b.bits[i >> 6] == 0) erase_if_idle(it);  // otherwise the block still counts
  }
  return after;
}

void PageCounts::hold_blocks(uint64_t first, uint64_t last) noexcept {
  for (uint64_t key = first >> kBlockShift;; ++key) {
    Block* b = find(key);
    IOMM_CHECK(b != nullptr, "holding a block that was not prepared");
    ++b->busy;
    if (key == last >> kBlockShift) break;
  }
}

void PageCounts::release_blocks(uint64_t first, uint64_t last) noexcept {
  for (uint64_t key = first >> kBlockShift;; ++key) {
    auto it = blocks_.find(key);
    IOMM_CHECK(it != blocks_.end() && it->second.busy > 0, "releasing a block not held");
    --it->second.busy;
    erase_if_idle(it);
    if (key == last >> kBlockShift) break;
  }
}

bool PageCounts::any_nonzero(uint64_t first, uint64_t last) const {
  return next(first, last, false) <= last;
}

uint64_t PageCounts::next_count(uint64_t from, uint64_t last, uint32_t value,
                                bool equal) const noexcept {
  for (uint64_t index = from; index <= last;) {
    const uint64_t base = index & ~kMask;
    const uint64_t block_last = std::min(last, base | kMask);
    const Block* b = find(index >> kBlockShift);
    if (b == nullptr) {
      if ((value == 0) == equal) return index;
    } else if (b->counts) {
      for (uint64_t i = index; i <= block_last; ++i) {
        if ((b->counts[i & kMask] == value) == equal) return i;
      }
    } else {
      const auto lo = static_cast<unsigned>(index & kMask);
      const auto hi = static_cast<unsigned>(block_last & kMask);
      for (unsigned w = lo / 64; w <= hi / 64; ++w) {
        // Indices of the word whose count (0 or 1) equals value.
        uint64_t eq = value == 0 ? ~b->bits[w] : value == 1 ? b->bits[w] : 0;
        if (!equal) eq = ~eq;
        eq &= word_mask(w, lo, hi);
        if (eq != 0) return base + w * 64 + static_cast<unsigned>(__builtin_ctzll(eq));
      }
    }
    if (block_last == last) break;
    index = block_last + 1;
  }
  return last + 1;
}

uint64_t PageCounts::count_nonzero(uint64_t first, uint64_t last) const noexcept {
  uint64_t n = 0;
  for (auto it = blocks_.lower_bound(first >> kBlockShift);
       it != blocks_.end() && it->first <= last >> kBlockShift; ++it) {
    const uint64_t base = it->first << kBlockShift;
    const auto lo = static_cast<unsigned>(std::max(first, base) - base);
    const auto hi = static_cast<unsigned>(std::min(last, base | kMask) - base);
    for (unsigned w = lo / 64; w <= hi / 64; ++w) {
      n += static_cast<uint64_t>(__builtin_popcountll(it->second.bits[w] & word_mask(w, lo, hi)));
    }
  }
  return n;
}

uint64_t PageCounts::add_range(uint64_t first, uint64_t last, uint32_t delta) noexcept {
  IOMM_CHECK(delta > 0, "raising page counts by zero");
  uint64_t was_zero = 0;
  for (uint64_t key = first >> kBlockShift;; ++key) {
    Block* b = find(key);
    IOMM_CHECK(b != nullptr, "page count raised outside a prepared range");
    const uint64_t base = key << kBlockShift;
    const auto lo = static_cast<unsigned>(std::max(first, base) - base);
    const auto hi = static_cast<unsigned>(std::min(last, base | kMask) - base);
    if (b->counts) {
      for (unsigned i = lo; i <= hi; ++i) {
        const uint32_t before = b->counts[i];
        IOMM_CHECK(before <= UINT32_MAX - delta, "page count overflow");
        b->counts[i] = before + delta;
        if (before <= 1 && before + delta > 1) ++b->above_one;
        if (before == 0) ++was_zero;
      }
    }
    for (unsigned w = lo / 64; w <= hi / 64; ++w) {
      const uint64_t m = word_mask(w, lo, hi);
      if (!b->counts) {
        IOMM_CHECK(delta == 1 && (b->bits[w] & m) == 0,
                   "page count raised above 1 without a count array");
        was_zero += static_cast<uint64_t>(__builtin_popcountll(m));
      }
      b->bits[w] |= m;
    }
    if (key == last >> kBlockShift) break;
  }
  return was_zero;
}

uint64_t PageCounts::sub_in_block(uint64_t key, unsigned lo, unsigned hi, uint32_t delta,
                                  uint64_t (&zeroed)[kWords]) noexcept {
  auto it = cache_;
  if (it == blocks_.end() || it->first != key) {
    it = blocks_.find(key);
    IOMM_CHECK(it != blocks_.end(), "page count underflow");
    cache_ = it;
  }
  Block& b = it->second;
  IOMM_CHECK(delta > 0, "lowering page counts by zero");
  uint64_t n = 0;
  if (b.counts) {
    uint32_t left_one = 0;  // indices that fell to 1 or below
    for (unsigned i = lo; i <= hi; ++i) {
      const uint32_t before = b.counts[i];
      IOMM_CHECK(before >= delta, "page count underflow");
      const uint32_t after = before - delta;
      b.counts[i] = after;
      if (before > 1 && after <= 1) ++left_one;
      if (after == 0) zeroed[i >> 6] |= uint64_t{1} << (i & 63);
    }
    b.above_one -= left_one;
    if (left_one != 0 && b.above_one == 0) b.counts.reset();
    for (unsigned w = lo / 64; w <= hi / 64; ++w) {
      b.bits[w] &= ~zeroed[w];
      n += static_cast<uint64_t>(__builtin_popcountll(zeroed[w]));
    }
  } else {
    IOMM_CHECK(delta == 1, "page count underflow");
    for (unsigned w = lo / 64; w <= hi / 64; ++w) {
      const uint64_t m = word_mask(w, lo, hi);
      IOMM_CHECK((b.bits[w] & m) == m, "page count underflow");
      b.bits[w] &= ~m;
      zeroed[w] = m;
      n += static_cast<uint64_t>(__builtin_popcountll(m));
    }
  }
  if (n != 0) erase_if_idle(it);
  return n;
}

}  // namespace iomm::mem
