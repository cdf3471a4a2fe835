// Radix I/O page table of a software IOMMU domain.
//
// Layout: 512-entry tables of std::atomic<uint64_t>, 9 IOVA bits per level
// above the 12-bit page offset; enough levels to cover the aperture's last
// address (4 levels for 48 bits, 6 for the full 64-bit space). An entry is 0
// (empty), a pointer to the next-level table, or a leaf holding a page-aligned
// address plus permission bits. Leaves sit at level 0 (4 KiB), 1 (2 MiB) or
// 2 (1 GiB) when allowed by page_sizes.
//
// Concurrency: lookup() is lock-free (acquire loads) and must run inside an
// RCU read-side section: tables are freed while the table lives. map() and
// unmap() of disjoint ranges may run concurrently: next-level tables are
// installed with compare-and-swap, and both hold structure_mu_ shared while
// they change entries. unmap() then takes it exclusively, briefly, to unlink
// the tables it emptied (no map can be filling them then); an unlinked table
// is only *retired*: a reader that entered it before the unlink still reads
// it (all entries not present). It is freed by free_retired(horizon), which
// the owner calls after an RCU grace period that began after the horizon was
// read (retire_horizon()). So the table count follows what is mapped, and an
// emptied slot takes a large leaf again.
//
// Memory: tables come from the page table's own TablePool (table_pool.hpp;
// past 64 tables, 2 MiB huge-page chunks), and "freed" above means given
// back to it, which may hand the table out again at once: never before the
// grace period.
//
// Translation caches (iomm::TranslationCache) register with the table's
// Iotlb (iotlb.hpp). Every path that clears or replaces a leaf ends in
// unmap_keeping_tables(), which empties them after clearing.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <shared_mutex>

#include "domain/iotlb.hpp"
#include "domain/table_pool.hpp"
#include "iomm/result.hpp"
#include "mem/host_access.hpp"
#include "sync/ranked_mutex.hpp"

namespace iomm::domain {

struct Leaf {
  uint64_t address = 0;  // address of the looked-up byte (host VA or synthetic)
  uint32_t prot = 0;     // kProtRead | kProtWrite
  mem::HostAccess host_access = mem::HostAccess::direct;  // how a DMA reaches the memory
  uint64_t size = 0;                                      // leaf size
  uint64_t remaining = 0;  // bytes from the looked-up byte to the end of the leaf
};

struct PageTableCounters {
  uint64_t mapped_bytes = 0;
  uint64_t leaves_4k = 0;
  uint64_t leaves_2m = 0;
  uint64_t leaves_1g = 0;
  uint64_t table_pages = 0;
};

namespace pte {
inline constexpr unsigned kEntriesPerTable = 512;
inline constexpr unsigned kBitsPerLevel = 9;
inline constexpr uint64_t kPresent = 1U << 0;
inline constexpr uint64_t kIsTable = 1U << 1;
inline constexpr uint64_t kReadable = 1U << 2;
inline constexpr uint64_t kWritable = 1U << 3;
// Two bits of mem::HostAccess.
inline constexpr unsigned kHostAccessShift = 4;
inline constexpr uint64_t kHostAccessMask = uint64_t{3} << kHostAccessShift;
inline constexpr uint64_t kAddressMask = ~uint64_t{4095};
constexpr unsigned level_shift(unsigned level) { return 12 + kBitsPerLevel * level; }
}  // namespace pte

class PageTable {
 public:
  // page_sizes: bitmask of 4 KiB | 2 MiB | 1 GiB (must include 4 KiB).
  static Result<std::unique_ptr<PageTable>> create(uint64_t aperture_last, uint64_t page_sizes);
  ~PageTable();
  PageTable(const PageTable&) = delete;
  PageTable& operator=(const PageTable&) = delete;

  // Map [iova, iova + length) to [address, address + length). iova, address
  // and length are 4 KiB aligned; the range is empty in the table (the IOAS
  // guarantees this). Uses the largest allowed leaf whose slot is empty and
  // where iova and address are aligned and the range covers it.
  // All-or-nothing: ENOMEM when a table cannot be allocated leaves the range
  // unmapped (tables allocated on the way stay, empty, until an unmap of the
  // range retires them).
  Status map(uint64_t iova, uint64_t address, uint64_t length, uint32_t prot,
             mem::HostAccess host_access);

  // Clear every leaf in [iova, iova + length) and retire the tables this
  // leaves empty. Leaves never straddle the range, because the IOAS unmaps
  // whole mappings. Returns bytes cleared. Never fails and never allocates.
  uint64_t unmap(uint64_t iova, uint64_t length) noexcept;
  // unmap() that leaves every table in place, so that mapping the same
  // range again at the same address cannot fail for lack of a table (the
  // undo paths of map() and of live update rely on it).
  uint64_t unmap_keeping_tables(uint64_t iova, uint64_t length) noexcept;

  // The retirement sequence so far (process-wide, over all page tables).
  // Read it after unmapping and before waiting for an RCU grace period; then
  // free_retired(horizon) frees what was retired up to it.
  static uint64_t retire_horizon() noexcept;
  // Free the tables retired at or before horizon. The caller has waited for
  // a grace period that began after it read horizon. Never fails.
  void free_retired(uint64_t horizon) noexcept;

  // Lock-free lookup of one IOVA. False if nothing is mapped there. Inline:
  // it is the translate() hot path.
  bool lookup(uint64_t iova, Leaf* out) const noexcept;
  // Lock-free lookups of iovas[0, n), software-pipelined: the upper levels
  // of lookup i + kLookahead are walked and its leaf entry prefetched before
  // the leaf entry of lookup i is read, so that the cache misses on the leaf
  // tables of independent lookups overlap (a loop of lookup() keeps few in
  // flight: each walk is a chain of dependent loads and branches). Calls
  // visit(i, entry, level) in order of i, with the leaf entry found for
  // iovas[i] (decode it with leaf_of) or 0 when nothing is mapped there;
  // stops early when visit returns false. Returns how many were visited.
  // Inside an RCU read-side section, like lookup().
  static constexpr size_t kLookahead = 64;
  template <typename Visit>
  size_t lookup_many(const uint64_t* iovas, size_t n, Visit&& visit) const noexcept;
  // The leaf of lookup_many's visit: a present leaf entry at level, for iova.
  static Leaf leaf_of(uint64_t entry, unsigned level, uint64_t iova) noexcept;
  // lookup(), with remaining extended over the following leaves of the same
  // table that continue the run (same prot and kind, next address) until it
  // covers max_bytes. Lets a DMA walk a contiguous range in one descent.
  bool lookup_run(uint64_t iova, uint64_t max_bytes, Leaf* out) const noexcept;

  // The registry of the caches in front of lookup() (iotlb.hpp), each of
  // which every unmap empties.
  [[nodiscard]] const Iotlb& iotlb() const noexcept { return iotlb_; }

  [[nodiscard]] PageTableCounters counters() const noexcept;
  // Where the tables' memory comes from (table_pool.hpp).
  [[nodiscard]] TablePoolCounts pool_counts() const noexcept { return pool_.counts(); }
  [[nodiscard]] unsigned levels() const noexcept { return levels_; }

 private:
  struct alignas(4096) Table {
    std::atomic<uint64_t> entries[pte::kEntriesPerTable];
  };
  static_assert(sizeof(Table) == TablePool::kTableBytes);
  PageTable(unsigned levels, uint64_t page_sizes);
  // A table from pool_, all entries empty; nullptr when out of memory.
  Table* allocate_table() noexcept;

  // Leaves placed or cleared by one call, by level: the shared counters are
  // updated once per call, not once per leaf (three atomic read-modify-writes
  // per leaf were a third of attaching 1 GiB of 2 MiB leaves).
  struct LeafCounts {
    uint64_t leaves[3] = {};
  };
  enum class CountChange { add, subtract };
  void change_counts(const LeafCounts& counts, CountChange change) noexcept;
  // Installs the leaf covering iova (or the first tables on its way) and the
  // leaves of the same size that follow it in the same table, counts them in
  // placed and returns the bytes they cover.
  Result<uint64_t> map_one_leaf(uint64_t iova, uint64_t address, uint64_t remaining,
                                uint64_t leaf_bits, LeafCounts* placed);
  [[nodiscard]] bool leaf_fits(unsigned level, uint64_t iova, uint64_t address,
                               uint64_t remaining) const noexcept;
  uint64_t clear_range(Table* table, unsigned level, uint64_t first, uint64_t last,
                       LeafCounts* cleared) noexcept;
  // Unlink and retire every table below `table` in [first, last] that is
  // empty. structure_mu_ held exclusively.
  void retire_empty(Table* table, unsigned level, uint64_t first, uint64_t last) noexcept;
  // Releases table and the tables below it to pool_.
  void free_table(Table* table, unsigned level) noexcept;
  static Table* table_of(uint64_t entry) noexcept {
    return reinterpret_cast<Table*>(entry & pte::kAddressMask);
  }

  // The slot lookup_many reads for an IOVA the levels do not cover.
  static constexpr std::atomic<uint64_t> kNothing{0};
  // Levels of a table covering the 64-bit space.
  static constexpr unsigned kMaxLevels = 6;
  template <unsigned Levels, typename Visit>
  size_t lookup_many_at(const uint64_t* iovas, size_t n, Visit& visit) const noexcept;

  // Declared first: destroyed after the destructor released every table.
  TablePool pool_;
  Table* root_ = nullptr;
  unsigned levels_;
  uint64_t page_sizes_;
  // Highest IOVA the levels can index (the aperture may end below it).
  uint64_t covered_last_;
  std::atomic<uint64_t> mapped_bytes_{0};
  std::atomic<uint64_t> leaves_[3] = {};
  std::atomic<uint64_t> table_pages_{1};
  // Held shared by map() and unmap() while they change entries; exclusively
  // to unlink emptied tables and to free retired ones (lock order:
  // docs/design.md).
  sync::RankedSharedMutex structure_mu_{sync::LockRank::page_table_structure,
                                        "PageTable::structure_mu_"};
  // Retired tables, newest first, linked through their own entries (entry 0:
  // the next table, entry 1: the retirement sequence shifted left by one).
  // Neither value has kPresent set, so a reader still inside a retired table
  // sees nothing mapped. Guarded by structure_mu_ (exclusive).
  Table* retired_ = nullptr;
  Iotlb iotlb_;
};

inline Leaf PageTable::leaf_of(uint64_t entry, unsigned level, uint64_t iova) noexcept {
  const uint64_t size = uint64_t{1} << pte::level_shift(level);
  const uint64_t offset = iova & (size - 1);
  return Leaf{
      .address = (entry & pte::kAddressMask) + offset,
      .prot = static_cast<uint32_t>((entry >> 2) & 3U),  // kReadable, kWritable -> kProt*
      .host_access =
          static_cast<mem::HostAccess>((entry & pte::kHostAccessMask) >> pte::kHostAccessShift),
      .size = size,
      .remaining = size - offset,
  };
}

inline bool PageTable::lookup(uint64_t iova, Leaf* out) const noexcept {
  if (iova > covered_last_) return false;
  const Table* table = root_;
  for (unsigned level = levels_ - 1;; --level) {
    const unsigned shift = pte::level_shift(level);
    const uint64_t entry = table->entries[(iova >> shift) & (pte::kEntriesPerTable - 1)].load(
        std::memory_order_acquire);
    if ((entry & pte::kPresent) == 0) return false;
    if ((entry & pte::kIsTable) != 0) {
      table = table_of(entry);
      continue;
    }
    *out = leaf_of(entry, level, iova);
    return true;
  }
}

template <typename Visit>
size_t PageTable::lookup_many(const uint64_t* iovas, size_t n, Visit&& visit) const noexcept {
  // One walk per depth, so that the upper levels unroll with constant
  // shifts (the loop over a run-time depth was two thirds of the
  // instructions per lookup).
  switch (levels_) {
    case 1:
      return lookup_many_at<1>(iovas, n, visit);
    case 2:
      return lookup_many_at<2>(iovas, n, visit);
    case 3:
      return lookup_many_at<3>(iovas, n, visit);
    case 4:
      return lookup_many_at<4>(iovas, n, visit);
    case 5:
      return lookup_many_at<5>(iovas, n, visit);
    default:
      static_assert(kMaxLevels == 6);
      return lookup_many_at<6>(iovas, n, visit);
  }
}

template <unsigned Levels, typename Visit>
size_t PageTable::lookup_many_at(const uint64_t* iovas, size_t n, Visit& visit) const noexcept {
  // A lookup in flight, one word: the slot its walk ended on, or'ed with
  // that slot's level (slots are 8-byte aligned, levels below 8). At level
  // 0 the slot is prefetched; above it, it held a leaf or nothing and is
  // read again when visited (a table installed there since reads as
  // nothing: a miss that a concurrent map may cause anyway). Copies of the
  // members: the acquire loads would make the compiler reload them.
  const Table* const root = root_;
  const uint64_t covered_last = covered_last_;
  // The walk resumes from the level-2 table the previous walk went through
  // when the IOVA lies under it (the same 512 GiB), as an IOMMU's
  // paging-structure cache skips the upper levels: it saves the loads above
  // it, which every lookup of a batch repeats. Inside the caller's RCU
  // read-side section the table stays readable; one unlinked meanwhile was
  // empty and reads as nothing, so its lookups miss into translate's walk.
  constexpr unsigned kResumeLevel = 2;
  uint64_t resume_tag = ~uint64_t{0};  // no IOVA shifted right has every bit set
  const Table* resume_table = root;
  const auto walk = [](const Table* table, uint64_t iova, unsigned level) {
    return &table->entries[(iova >> pte::level_shift(level)) & (pte::kEntriesPerTable - 1)];
  };
  const auto start = [&](uint64_t iova) -> uintptr_t {
    if (iova > covered_last) return reinterpret_cast<uintptr_t>(&kNothing);
    const Table* table = root;
    if constexpr (Levels > kResumeLevel + 1) {
      const uint64_t tag = iova >> pte::level_shift(kResumeLevel + 1);
      if (tag != resume_tag) [[unlikely]] {
        for (unsigned level = Levels - 1; level > kResumeLevel; --level) {
          const std::atomic<uint64_t>* slot = walk(table, iova, level);
          const uint64_t entry = slot->load(std::memory_order_acquire);
          if ((entry & (pte::kPresent | pte::kIsTable)) != (pte::kPresent | pte::kIsTable)) {
            return reinterpret_cast<uintptr_t>(slot) | level;
          }
          table = table_of(entry);
        }
        resume_table = table;
        resume_tag = tag;
      }
      table = resume_table;
    }
#pragma GCC unroll 8
    for (unsigned level = std::min(Levels - 1, kResumeLevel); level > 0; --level) {
      const std::atomic<uint64_t>* slot = walk(table, iova, level);
      const uint64_t entry = slot->load(std::memory_order_acquire);
      if ((entry & (pte::kPresent | pte::kIsTable)) != (pte::kPresent | pte::kIsTable)) {
        return reinterpret_cast<uintptr_t>(slot) | level;
      }
      table = table_of(entry);
    }
    const std::atomic<uint64_t>* slot = walk(table, iova, 0);
    __builtin_prefetch(slot);
    return reinterpret_cast<uintptr_t>(slot);
  };
  uintptr_t ring[kLookahead];
  const size_t ahead = n < kLookahead ? n : kLookahead;
  for (size_t i = 0; i < ahead; ++i) ring[i] = start(iovas[i]);
  for (size_t i = 0; i < n; ++i) {
    uintptr_t& pending = ring[i % kLookahead];
    const auto* slot = reinterpret_cast<const std::atomic<uint64_t>*>(pending & ~uintptr_t{7});
    const auto level = static_cast<unsigned>(pending & 7);
    uint64_t entry = slot->load(std::memory_order_acquire);
    // A leaf or nothing (a retired table's entries have no kPresent bit).
    if ((entry & (pte::kPresent | pte::kIsTable)) != pte::kPresent) entry = 0;
    if (i + kLookahead < n) pending = start(iovas[i + kLookahead]);
    if (!visit(i, entry, level)) return i;
  }
  return n;
}

}  // namespace iomm::domain
