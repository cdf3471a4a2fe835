// Dirty log: one bit per 4 KiB IOVA page, set by writers (software-domain
// DMA, access writes) while tracking is enabled, read and cleared by range.
//
// Storage is a lazily built radix of 512-entry tables over the page index
// (52 bits of a 64-bit IOVA), with 32768-page leaf blocks of atomic words.
// Marking is lock-free (tables installed by compare-and-swap). Marking may
// allocate: it reports false when it cannot, so the writer can fail rather
// than lose a dirty bit. Tables whose IOVA span no mapping overlaps any more
// are freed by release_unused(), which the IOAS calls when an unmap has
// removed the mappings (see its contract for what the caller excludes).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <span>

namespace iomm::dirty {

class DirtyLog {
 public:
  DirtyLog() = default;
  ~DirtyLog();
  DirtyLog(const DirtyLog&) = delete;
  DirtyLog& operator=(const DirtyLog&) = delete;

  // Enabling starts from a clean log; disabling clears it.
  void set_enabled(bool on) noexcept;
  [[nodiscard]] bool enabled() const noexcept { return enabled_.load(std::memory_order_acquire); }

  // Mark every page touched by [iova, iova + length). No-op when disabled.
  // False only when a table could not be allocated.
  bool mark(uint64_t iova, uint64_t length) noexcept;

  // OR the bits of pages [first_page, first_page + npages) into out (bit i
  // of out = page out_first_page + i, by default first_page; pages outside
  // out are dropped); with clear, also clear them in the log.
  void collect(uint64_t first_page, uint64_t npages, std::span<uint64_t> out, bool clear) noexcept {
    collect(first_page, npages, out, clear, first_page);
  }
  void collect(uint64_t first_page, uint64_t npages, std::span<uint64_t> out, bool clear,
               uint64_t out_first_page) noexcept;
  // Clear pages [first_page, last_page] (inclusive).
  void clear(uint64_t first_page, uint64_t last_page) noexcept;

  // Whether any mapping overlaps pages [first_page, last_page].
  using InUse = bool (*)(const void* context, uint64_t first_page, uint64_t last_page);
  // Free every table (inner node or leaf block) that covers part of pages
  // [first_page, last_page] and whose whole span in_use() says no mapping
  // overlaps. The caller guarantees that nothing walks the log meanwhile
  // (collectors and clearers are excluded) and that no writer can mark a
  // page no mapping covers (its translations are gone and readers were
  // waited for). Never fails.
  void release_unused(uint64_t first_page, uint64_t last_page, InUse in_use,
                      const void* context) noexcept;
  // Tables (inner nodes and leaf blocks) allocated now, for tests.
  [[nodiscard]] size_t tables() const noexcept { return tables_.load(std::memory_order_relaxed); }

 private:
  static constexpr unsigned kLeafWordsShift = 9;                    // 512 words per block
  static constexpr unsigned kLeafPagesShift = kLeafWordsShift + 6;  // 32768 pages
  static constexpr unsigned kBits = 9;                              // per inner level
  static constexpr unsigned kLevels = 5;  // 15 + 5 * 9 = 60 >= 52 page bits

  struct Node {
    std::atomic<void*> slot[1U << kBits];
  };
  struct Block {
    std::atomic<uint64_t> word[1U << kLeafWordsShift];
  };

  // The block for page, created when create is set; nullptr if absent or if
  // allocation failed.
  Block* block(uint64_t page, bool create) noexcept;
  // f(page, bits, n) for every non-zero word in range; clear also clears it.
  template <typename F>
  void for_each_word(uint64_t first_page, uint64_t last_page, bool clear, F f) noexcept;
  // The slots [*lo, *hi] of a node at `level` whose span starts at block
  // `base` that blocks [first_block, last_block] reach; false if none. Walks
  // visit only these: scanning every slot of every level was most of the
  // log's share of an unmap.
  static bool reached_slots(unsigned level, uint64_t base, uint64_t first_block,
                            uint64_t last_block, unsigned* lo, unsigned* hi) noexcept;
  // Free everything below n (not n itself).
  void free_node(Node* n, unsigned level) noexcept;
  void prune(Node* n, unsigned level, uint64_t base, uint64_t first_block, uint64_t last_block,
             InUse in_use, const void* context) noexcept;

  std::atomic<bool> enabled_{false};
  std::atomic<size_t> tables_{0};
  Node root_{};
};

}  // namespace iomm::dirty
