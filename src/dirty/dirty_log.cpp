#include "dirty/dirty_log.hpp"

#include <algorithm>
#include <new>

#include "fault/inject.hpp"

namespace iomm::dirty {

DirtyLog::~DirtyLog() { free_node(&root_, kLevels - 1); }

void DirtyLog::free_node(Node* n, unsigned level) noexcept {
  for (auto& s : n->slot) {
    void* p = s.load(std::memory_order_relaxed);
    if (p == nullptr) continue;
    s.store(nullptr, std::memory_order_relaxed);
    if (level == 0) {
      delete static_cast<Block*>(p);
    } else {
      Node* child = static_cast<Node*>(p);
      free_node(child, level - 1);
      delete child;
    }
    tables_.fetch_sub(1, std::memory_order_relaxed);
  }
}

void DirtyLog::release_unused(uint64_t first_page, uint64_t last_page, InUse in_use,
                              const void* context) noexcept {
  const uint64_t max_page = UINT64_MAX >> 12;
  if (last_page > max_page) last_page = max_page;
  if (first_page > last_page) return;
  prune(&root_, kLevels - 1, 0, first_page >> kLeafPagesShift, last_page >> kLeafPagesShift, in_use,
        context);
}

bool DirtyLog::reached_slots(unsigned level, uint64_t base, uint64_t first_block,
                             uint64_t last_block, unsigned* lo, unsigned* hi) noexcept {
  const unsigned shift = level * kBits;
  constexpr uint64_t kLastSlot = (1U << kBits) - 1;
  if (last_block < base) return false;
  const uint64_t from = first_block > base ? (first_block - base) >> shift : 0;
  if (from > kLastSlot) return false;
  *lo = static_cast<unsigned>(from);
  *hi = static_cast<unsigned>(std::min((last_block - base) >> shift, kLastSlot));
  return true;
}

// n covers blocks [base, base + 512^(level + 1) - 1]; slot i a 512^level
// share of them.
void DirtyLog::prune(Node* n, unsigned level, uint64_t base, uint64_t first_block,
                     uint64_t last_block, InUse in_use, const void* context) noexcept {
  const unsigned shift = level * kBits;
  const uint64_t max_page = UINT64_MAX >> 12;
  unsigned first_slot = 0;
  unsigned last_slot = 0;
  if (!reached_slots(level, base, first_block, last_block, &first_slot, &last_slot)) return;
  for (unsigned i = first_slot; i <= last_slot; ++i) {
    std::atomic<void*>& slot = n->slot[i];
    void* p = slot.load(std::memory_order_acquire);
    if (p == nullptr) continue;
    const uint64_t lo = base | (uint64_t{i} << shift);
    const uint64_t hi = lo | ((uint64_t{1} << shift) - 1);
    if (hi < first_block || lo > last_block) continue;
    const uint64_t span_first = lo << kLeafPagesShift;
    uint64_t span_last = (hi << kLeafPagesShift) | ((uint64_t{1} << kLeafPagesShift) - 1);
    if (span_last > max_page) span_last = max_page;
    if (in_use(context, span_first, span_last)) {
      if (level > 0) {
        prune(static_cast<Node*>(p), level - 1, lo, first_block, last_block, in_use, context);
      }
      continue;
    }
    slot.store(nullptr, std::memory_order_release);
    if (level == 0) {
      delete static_cast<Block*>(p);
    } else {
      free_node(static_cast<Node*>(p), level - 1);
      delete static_cast<Node*>(p);
    }
    tables_.fetch_sub(1, std::memory_order_relaxed);
  }
}

DirtyLog::Block* DirtyLog::block(uint64_t page, bool create) noexcept {
  const uint64_t index = page >> kLeafPagesShift;
  Node* node = &root_;
  for (unsigned level = kLevels - 1;; --level) {
    std::atomic<void*>& slot = node->slot[(index >> (level * kBits)) & ((1U << kBits) - 1)];
    void* p = slot.load(std::memory_order_acquire);
    if (p == nullptr) {
      if (!create) return nullptr;
      void* fresh = IOMM_INJECT("dirty.alloc") ? nullptr
                    : level == 0               ? static_cast<void*>(new (std::nothrow) Block{})
                                               : static_cast<void*>(new (std::nothrow) Node{});
      if (fresh == nullptr) return nullptr;
      if (slot.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) {
        p = fresh;
        tables_.fetch_add(1, std::memory_order_relaxed);
      } else if (level == 0) {
        delete static_cast<Block*>(fresh);
      } else {
        delete static_cast<Node*>(fresh);
      }
    }
    if (level == 0) return static_cast<Block*>(p);
    node = static_cast<Node*>(p);
  }
}

void DirtyLog::set_enabled(bool on) noexcept {
  clear(0, UINT64_MAX >> 12);
  enabled_.store(on, std::memory_order_release);
}

bool DirtyLog::mark(uint64_t iova, uint64_t length) noexcept {
  if (length == 0 || !enabled()) return true;
  const uint64_t first = iova >> 12;
  const uint64_t last = (iova + (length - 1)) >> 12;
  for (uint64_t page = first; page <= last;) {
    Block* b = block(page, true);
    if (b == nullptr) return false;
    const uint64_t block_last = page | ((uint64_t{1} << kLeafPagesShift) - 1);
    const uint64_t end = last < block_last ? last : block_last;
    while (page <= end) {
      const unsigned bit = page & 63;
      const uint64_t n = end - page + 1 < 64 - bit ? end - page + 1 : 64 - bit;
      const uint64_t mask = (n == 64 ? ~uint64_t{0} : ((uint64_t{1} << n) - 1)) << bit;
      std::atomic<uint64_t>& w = b->word[(page >> 6) & ((1U << kLeafWordsShift) - 1)];
      if ((w.load(std::memory_order_relaxed) & mask) != mask) {
        w.fetch_or(mask, std::memory_order_release);
      }
      page += n;
    }
    if (end == UINT64_MAX >> 12) break;
  }
  return true;
}

template <typename F>
void DirtyLog::for_each_word(uint64_t first_page, uint64_t last_page, bool clear, F f) noexcept {
  for (uint64_t page = first_page; page <= last_page;) {
    const uint64_t block_last = page | ((uint64_t{1} << kLeafPagesShift) - 1);
    const uint64_t end = last_page < block_last ? last_page : block_last;
    Block* b = block(page, false);
    if (b != nullptr) {
      while (page <= end) {
        const unsigned bit = page & 63;
        const uint64_t n = end - page + 1 < 64 - bit ? end - page + 1 : 64 - bit;
        const uint64_t mask = (n == 64 ? ~uint64_t{0} : ((uint64_t{1} << n) - 1)) << bit;
        std::atomic<uint64_t>& w = b->word[(page >> 6) & ((1U << kLeafWordsShift) - 1)];
        if ((w.load(std::memory_order_relaxed) & mask) != 0) {
          const uint64_t word = clear ? w.fetch_and(~mask, std::memory_order_acq_rel)
                                      : w.load(std::memory_order_acquire);
          f(page, (word & mask) >> bit, n);
        }
        page += n;
      }
    }
    if (end >= last_page) break;
    page = end + 1;
  }
}

void DirtyLog::collect(uint64_t first_page, uint64_t npages, std::span<uint64_t> out, bool clear,
                       uint64_t out_first_page) noexcept {
  if (npages == 0) return;
  for_each_word(first_page, first_page + npages - 1, clear,
                [&](uint64_t page, uint64_t bits, uint64_t) {
                  while (bits != 0) {
                    const unsigned b = __builtin_ctzll(bits);
                    bits &= bits - 1;
                    if (page + b < out_first_page) continue;
                    const uint64_t i = page + b - out_first_page;
                    if ((i >> 6) < out.size()) out[i >> 6] |= uint64_t{1} << (i & 63);
                  }
                });
}

void DirtyLog::clear(uint64_t first_page, uint64_t last_page) noexcept {
  // Walk only the blocks that exist: the whole space has 2^37 block slots.
  struct Walker {
    static void walk(Node* n, unsigned level, uint64_t base, uint64_t first_block,
                     uint64_t last_block, DirtyLog* log, uint64_t fp, uint64_t lp) {
      const unsigned shift = level * kBits;
      unsigned first_slot = 0;
      unsigned last_slot = 0;
      if (!reached_slots(level, base, first_block, last_block, &first_slot, &last_slot)) return;
      for (unsigned i = first_slot; i <= last_slot; ++i) {
        void* p = n->slot[i].load(std::memory_order_acquire);
        if (p == nullptr) continue;
        const uint64_t lo = base | (uint64_t{i} << shift);
        const uint64_t hi = lo | ((uint64_t{1} << shift) - 1);
        if (hi < first_block || lo > last_block) continue;
        if (level == 0) {
          const uint64_t bfirst = lo << kLeafPagesShift;
          const uint64_t blast = bfirst | ((uint64_t{1} << kLeafPagesShift) - 1);
          log->for_each_word(fp > bfirst ? fp : bfirst, lp < blast ? lp : blast, true,
                             [](uint64_t, uint64_t, uint64_t) {});
        } else {
          walk(static_cast<Node*>(p), level - 1, lo, first_block, last_block, log, fp, lp);
        }
      }
    }
  };
  const uint64_t max_page = UINT64_MAX >> 12;
  if (last_page > max_page) last_page = max_page;
  if (first_page > last_page) return;
  Walker::walk(&root_, kLevels - 1, 0, first_page >> kLeafPagesShift, last_page >> kLeafPagesShift,
               this, first_page, last_page);
}

}  // namespace iomm::dirty
