#include "domain/table_pool.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <cassert>
#include <cstdint>
#include <mutex>
#include <new>

#include "fault/inject.hpp"

namespace iomm::domain {

TablePool::~TablePool() {
  assert(single_tables_ == 0 && chunk_tables_ == 0);
  for (const uintptr_t chunk : chunks_) munmap(reinterpret_cast<void*>(chunk), kChunkBytes);
}

bool TablePool::add_chunk() noexcept {
  // Twice the size, to cut a 2 MiB-aligned chunk out of it.
  void* mapped =
      mmap(nullptr, 2 * kChunkBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapped == MAP_FAILED) return false;
  auto* const start = static_cast<char*>(mapped);
  const uintptr_t aligned =
      (reinterpret_cast<uintptr_t>(start) + kChunkBytes - 1) & ~(uintptr_t{kChunkBytes} - 1);
  auto* const chunk = reinterpret_cast<char*>(aligned);
  if (chunk != start) munmap(start, static_cast<size_t>(chunk - start));
  munmap(chunk + kChunkBytes, static_cast<size_t>(start + 2 * kChunkBytes - (chunk + kChunkBytes)));
  // Advice only: without transparent huge pages the chunk is 4 KiB pages,
  // which work the same, with a TLB miss per walk as before.
  madvise(chunk, kChunkBytes, MADV_HUGEPAGE);
  try {
    chunks_.insert(std::upper_bound(chunks_.begin(), chunks_.end(), aligned), aligned);
  } catch (const std::bad_alloc&) {
    munmap(chunk, kChunkBytes);
    return false;
  }
  carve_next_ = chunk;
  carve_end_ = chunk + kChunkBytes;
  return true;
}

void* TablePool::allocate() noexcept {
  if (IOMM_INJECT("domain.table_alloc")) return nullptr;
  const std::lock_guard lock(mu_);
  if (chunks_.empty() && single_tables_ < kSingleTables) {
    void* table = ::operator new (kTableBytes, std::align_val_t{kTableBytes}, std::nothrow);
    if (table != nullptr) ++single_tables_;
    return table;
  }
  void* table = free_;
  if (table != nullptr) {
    free_ = *static_cast<void**>(table);
    --free_tables_;
  } else {
    if (carve_next_ == carve_end_ && !add_chunk()) return nullptr;
    table = carve_next_;
    carve_next_ += kTableBytes;
  }
  ++chunk_tables_;
  return table;
}

void TablePool::release(void* table) noexcept {
  const std::lock_guard lock(mu_);
  if (!in_chunk(table)) {
    ::operator delete (table, std::align_val_t{kTableBytes});
    --single_tables_;
    return;
  }
  *static_cast<void**>(table) = free_;
  free_ = table;
  ++free_tables_;
  --chunk_tables_;
}

bool TablePool::in_chunk(const void* table) const noexcept {
  const uintptr_t chunk = reinterpret_cast<uintptr_t>(table) & ~(uintptr_t{kChunkBytes} - 1);
  return std::binary_search(chunks_.begin(), chunks_.end(), chunk);
}

TablePoolCounts TablePool::counts() const noexcept {
  const std::lock_guard lock(mu_);
  return TablePoolCounts{
      .single_tables = single_tables_,
      .chunks = chunks_.size(),
      .chunk_tables = chunk_tables_,
      .free_tables = free_tables_,
  };
}

}  // namespace iomm::domain
