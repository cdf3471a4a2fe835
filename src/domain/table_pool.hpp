// Memory for the 4 KiB tables of one page table (domain/page_table.hpp).
//
// Why: lookups land on random leaf tables, so on 4 KiB pages each one takes
// a TLB miss besides its cache miss (the kernel's IOMMU page tables live in
// its direct map, on huge pages). Once a page table holds kSingleTables
// tables, the pool carves further tables out of 2 MiB-aligned chunks advised
// MADV_HUGEPAGE, so a walk over a large domain reads its leaf tables through
// a few huge-page TLB entries. Below that, each table is an allocation of
// its own, so a small domain never pays for a 2 MiB chunk.
//
// Ownership: the pool owns its chunks and unmaps them when destroyed. A
// released single table is freed; a released chunk table goes onto the
// pool's free list and is handed out again before any fresh one. So a
// domain past the threshold keeps the table memory of its peak until it is
// destroyed (the page table's own count, table_pages, follows what is
// mapped). Every table must be released before the pool is destroyed.
//
// Locking: allocate() and release() take the pool's mutex, a leaf lock
// (maps allocate concurrently under the page table's structure_mu_ held
// shared; free_retired releases under it held exclusively).
//
// Errors: allocate() returns nullptr when the memory cannot be had, and at
// the domain.table_alloc fault point, with the pool unchanged. Memory it
// hands out is not initialized: the caller constructs the table in it.
// release() takes only a table no reader can reach any more (an RCU grace
// period after it was unlinked, or never published) and cannot fail.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "sync/ranked_mutex.hpp"

namespace iomm::domain {

struct TablePoolCounts {
  uint64_t single_tables = 0;  // allocated one by one, not yet released
  uint64_t chunks = 0;         // 2 MiB chunks held
  uint64_t chunk_tables = 0;   // tables of the chunks handed out, not yet released
  uint64_t free_tables = 0;    // released chunk tables waiting for reuse
};

class TablePool {
 public:
  static constexpr size_t kTableBytes = 4096;
  static constexpr size_t kChunkBytes = size_t{2} << 20;
  static constexpr size_t kTablesPerChunk = kChunkBytes / kTableBytes;
  // Tables allocated one by one before the first chunk: 256 KiB, so a
  // domain's first chunk at most multiplies its table memory by nine.
  static constexpr size_t kSingleTables = 64;

  TablePool() noexcept = default;
  ~TablePool();
  TablePool(const TablePool&) = delete;
  TablePool& operator=(const TablePool&) = delete;

  // kTableBytes aligned to kTableBytes, or nullptr.
  void* allocate() noexcept;
  void release(void* table) noexcept;

  [[nodiscard]] TablePoolCounts counts() const noexcept;

 private:
  [[nodiscard]] bool in_chunk(const void* table) const noexcept;
  // Maps a chunk and makes it the one carved from; false when it cannot.
  bool add_chunk() noexcept;

  mutable sync::RankedMutex mu_{sync::LockRank::table_pool, "TablePool::mu_"};
  // Chunk addresses, sorted (release finds a table's chunk by binary
  // search; chunks are aligned to their size).
  std::vector<uintptr_t> chunks_;
  // The part of the newest chunk not handed out yet.
  char* carve_next_ = nullptr;
  char* carve_end_ = nullptr;
  // Released chunk tables, linked through their first word.
  void* free_ = nullptr;
  uint64_t single_tables_ = 0;
  uint64_t chunk_tables_ = 0;
  uint64_t free_tables_ = 0;
};

}  // namespace iomm::domain
