#include "domain/table_pool.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <set>
#include <thread>
#include <vector>

#include "domain/page_table.hpp"
#include "fault/fail_nth.hpp"
#include "iomm/domain.hpp"
#include "test_support.hpp"

namespace iomm::domain {
namespace {

constexpr uint64_t k4K = kPageSize;
constexpr uint64_t k2M = kPageSize2M;
constexpr uint32_t kReadWrite = kProtRead | kProtWrite;
constexpr uint64_t k48BitLast = (uint64_t{1} << 48) - 1;

uintptr_t chunk_of(const void* table) {
  return reinterpret_cast<uintptr_t>(table) & ~(uintptr_t{TablePool::kChunkBytes} - 1);
}

// Allocates n tables, failing the test if one cannot be had.
std::vector<void*> allocate(TablePool& pool, size_t n) {
  std::vector<void*> tables;
  for (size_t i = 0; i < n; ++i) {
    void* table = pool.allocate();
    EXPECT_NE(table, nullptr);
    if (table == nullptr) break;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(table) % TablePool::kTableBytes, 0U);
    tables.push_back(table);
  }
  return tables;
}

TEST(TablePool, SmallUseTakesNoChunk) {
  TablePool pool;
  std::vector<void*> tables = allocate(pool, TablePool::kSingleTables);
  TablePoolCounts counts = pool.counts();
  EXPECT_EQ(counts.single_tables, TablePool::kSingleTables);
  EXPECT_EQ(counts.chunks, 0U);
  for (void* table : tables) pool.release(table);
  counts = pool.counts();
  EXPECT_EQ(counts.single_tables, 0U);
  EXPECT_EQ(counts.free_tables, 0U);
}

TEST(TablePool, PastTheSinglesTablesComeFromAlignedChunks) {
  TablePool pool;
  std::vector<void*> singles = allocate(pool, TablePool::kSingleTables);
  std::vector<void*> carved = allocate(pool, TablePool::kTablesPerChunk + 1);
  ASSERT_EQ(carved.size(), TablePool::kTablesPerChunk + 1);
  TablePoolCounts counts = pool.counts();
  EXPECT_EQ(counts.chunks, 2U);
  EXPECT_EQ(counts.chunk_tables, TablePool::kTablesPerChunk + 1);
  // One chunk holds the first 512 tables, each once; the next one starts
  // the second chunk.
  const uintptr_t first_chunk = chunk_of(carved[0]);
  std::set<void*> distinct;
  for (size_t i = 0; i < TablePool::kTablesPerChunk; ++i) {
    EXPECT_EQ(chunk_of(carved[i]), first_chunk);
    distinct.insert(carved[i]);
  }
  EXPECT_EQ(distinct.size(), TablePool::kTablesPerChunk);
  EXPECT_NE(chunk_of(carved.back()), first_chunk);

  // Singles released after chunks exist are still freed, not pooled.
  for (void* table : singles) pool.release(table);
  EXPECT_EQ(pool.counts().single_tables, 0U);
  EXPECT_EQ(pool.counts().free_tables, 0U);
  for (void* table : carved) pool.release(table);
  counts = pool.counts();
  EXPECT_EQ(counts.chunk_tables, 0U);
  EXPECT_EQ(counts.free_tables, TablePool::kTablesPerChunk + 1);
  EXPECT_EQ(counts.chunks, 2U);  // kept until the pool is destroyed
}

TEST(TablePool, ReleasedChunkTablesAreReusedBeforeFreshOnes) {
  TablePool pool;
  std::vector<void*> singles = allocate(pool, TablePool::kSingleTables);
  std::vector<void*> carved = allocate(pool, 3);
  pool.release(carved[1]);
  EXPECT_EQ(pool.counts().free_tables, 1U);
  void* again = pool.allocate();
  EXPECT_EQ(again, carved[1]);
  EXPECT_EQ(pool.counts().free_tables, 0U);
  EXPECT_EQ(pool.counts().chunks, 1U);
  carved[1] = again;
  for (void* table : carved) pool.release(table);
  for (void* table : singles) pool.release(table);
}

TEST(TablePool, FailedAllocationLeavesThePoolUnchanged) {
  TablePool pool;
  std::vector<void*> singles = allocate(pool, TablePool::kSingleTables);
  const TablePoolCounts before = pool.counts();
  fault::fail_nth(1);
  EXPECT_EQ(pool.allocate(), nullptr);
  EXPECT_EQ(fault::disarm().failed_name, "domain.table_alloc");
  const TablePoolCounts after = pool.counts();
  EXPECT_EQ(after.single_tables, before.single_tables);
  EXPECT_EQ(after.chunks, 0U);
  EXPECT_EQ(after.chunk_tables, 0U);
  for (void* table : singles) pool.release(table);
}

// A page table of a 48-bit aperture mapping one 4 KiB page in each of n
// 2 MiB slots from `base`: a leaf table per page, plus the three above.
std::unique_ptr<PageTable> table_with_leaf_tables(uint64_t base, uint64_t n) {
  auto created = PageTable::create(k48BitLast, kPageSize);
  EXPECT_TRUE(created.ok());
  std::unique_ptr<PageTable> table = std::move(created).value();
  for (uint64_t i = 0; i < n; ++i) {
    EXPECT_OK(table->map(base + i * k2M, i * k4K, k4K, kReadWrite, mem::HostAccess::direct));
  }
  return table;
}

TEST(TablePool, PageTableReusesTablesOnlyAfterTheyAreFreed) {
  // The root, a level-2 and a level-1 table, then 128 leaf tables: the
  // first 64 tables are singles, the other 67 from one chunk.
  constexpr uint64_t kLeafTables = 2 * TablePool::kSingleTables;
  constexpr uint64_t kFromChunk = kLeafTables + 3 - TablePool::kSingleTables;
  auto table = table_with_leaf_tables(0, kLeafTables);
  EXPECT_EQ(table->counters().table_pages, kLeafTables + 3);
  TablePoolCounts counts = table->pool_counts();
  EXPECT_EQ(counts.single_tables, TablePool::kSingleTables);
  EXPECT_EQ(counts.chunk_tables, kFromChunk);
  EXPECT_EQ(counts.chunks, 1U);

  // Unmapped, every table but the root is retired, not released: a reader
  // may be inside them until a grace period has passed. A map meanwhile
  // takes fresh tables (a level-2, a level-1 and a leaf table).
  table->unmap(0, kLeafTables * k2M);
  const uint64_t horizon = PageTable::retire_horizon();
  counts = table->pool_counts();
  EXPECT_EQ(counts.free_tables, 0U);
  EXPECT_EQ(counts.chunk_tables, kFromChunk);
  ASSERT_OK(table->map(512 * k2M, 0, k4K, kReadWrite, mem::HostAccess::direct));
  EXPECT_EQ(table->pool_counts().free_tables, 0U);
  EXPECT_EQ(table->pool_counts().chunk_tables, kFromChunk + 3);

  // After the grace period they go back: singles freed, chunk tables to the
  // free list, where the next maps find them.
  table->free_retired(horizon);
  counts = table->pool_counts();
  EXPECT_EQ(counts.single_tables, 1U);  // the root
  EXPECT_EQ(counts.chunk_tables, 3U);
  EXPECT_EQ(counts.free_tables, kFromChunk);
  EXPECT_EQ(table->counters().table_pages, 4U);
  // A level-1 table and 8 leaf tables, all from the free list.
  for (uint64_t i = 0; i < 8; ++i) {
    ASSERT_OK(table->map(1024 * k2M + i * k2M, 0, k4K, kReadWrite, mem::HostAccess::direct));
  }
  EXPECT_EQ(table->pool_counts().free_tables, kFromChunk - 9);
  EXPECT_EQ(table->pool_counts().chunks, 1U);

  // Everything unmapped and freed: only the root is in use.
  table->unmap(0, uint64_t{1} << 40);
  table->free_retired(PageTable::retire_horizon());
  counts = table->pool_counts();
  EXPECT_EQ(table->counters().table_pages, 1U);
  EXPECT_EQ(counts.single_tables, 1U);
  EXPECT_EQ(counts.chunk_tables, 0U);
  EXPECT_EQ(counts.free_tables, kFromChunk + 3);
}

TEST(TablePool, MapOutOfTablesIsAllOrNothing) {
  // Past the singles, so the failing allocation is a chunk table.
  auto table = table_with_leaf_tables(0, TablePool::kSingleTables);
  const PageTableCounters before = table->counters();
  const TablePoolCounts pool_before = table->pool_counts();
  ASSERT_GT(pool_before.chunk_tables, 0U);
  // A range over two new leaf tables; the second allocation fails.
  const uint64_t iova = 4096 * k2M - k4K;
  fault::fail_nth(2);
  EXPECT_ERRNO(table->map(iova, 0, 2 * k4K, kReadWrite, mem::HostAccess::direct), ENOMEM);
  EXPECT_EQ(fault::disarm().failed_name, "domain.table_alloc");
  Leaf leaf;
  EXPECT_FALSE(table->lookup(iova, &leaf));
  EXPECT_FALSE(table->lookup(iova + k4K, &leaf));
  EXPECT_EQ(table->counters().mapped_bytes, before.mapped_bytes);
  // The table allocated on the way stays, empty, until an unmap retires it.
  table->unmap(iova, 2 * k4K);
  table->free_retired(PageTable::retire_horizon());
  EXPECT_EQ(table->counters().table_pages, before.table_pages);
  const TablePoolCounts pool_after = table->pool_counts();
  EXPECT_EQ(pool_after.single_tables + pool_after.chunk_tables,
            pool_before.single_tables + pool_before.chunk_tables);
}

TEST(TablePool, ConcurrentMapsAndUnmapsShareThePool) {
  auto created = PageTable::create(k48BitLast, kPageSize);
  ASSERT_TRUE(created.ok());
  const std::unique_ptr<PageTable> table = std::move(created).value();
  constexpr uint64_t kThreads = 4;
  constexpr uint64_t kLeafTablesEach = 64;
  std::vector<std::thread> threads;
  for (uint64_t t = 0; t < kThreads; ++t) {
    threads.emplace_back([&table, t] {
      // Each thread its own 1 GiB: a level-1 table and 64 leaf tables.
      const uint64_t base = (t + 1) * kPageSize1G;
      for (int round = 0; round < 3; ++round) {
        for (uint64_t i = 0; i < kLeafTablesEach; ++i) {
          EXPECT_OK(table->map(base + i * k2M, i * k4K, k4K, kReadWrite, mem::HostAccess::direct));
        }
        EXPECT_EQ(table->unmap(base, kPageSize1G), kLeafTablesEach * k4K);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  table->free_retired(PageTable::retire_horizon());
  const TablePoolCounts counts = table->pool_counts();
  EXPECT_EQ(table->counters().table_pages, 1U);
  EXPECT_EQ(counts.single_tables + counts.chunk_tables, 1U);
  EXPECT_GT(counts.chunks, 0U);
}

}  // namespace
}  // namespace iomm::domain
