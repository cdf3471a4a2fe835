#include "domain/page_table.hpp"

#include <bit>
#include <cerrno>
#include <mutex>
#include <new>

#include "iomm/domain.hpp"
#include "iomm/range.hpp"

namespace iomm::domain {

namespace {

using pte::kAddressMask;
using pte::kBitsPerLevel;
using pte::kEntriesPerTable;
using pte::kHostAccessMask;
using pte::kHostAccessShift;
using pte::kIsTable;
using pte::kPresent;
using pte::kReadable;
using pte::kWritable;
constexpr unsigned kMaxLeafLevel = 2;
static_assert(kReadable >> 2 == kProtRead && kWritable >> 2 == kProtWrite);

constexpr uint64_t kSupportedPageSizes = kPageSize | kPageSize2M | kPageSize1G;

using pte::level_shift;
constexpr uint64_t level_size(unsigned level) { return uint64_t{1} << level_shift(level); }
constexpr unsigned index_at(uint64_t iova, unsigned level) {
  return static_cast<unsigned>(iova >> level_shift(level)) & (kEntriesPerTable - 1);
}

constexpr bool is_table(uint64_t entry) { return (entry & kIsTable) != 0; }

// Retirement sequence shared by every page table, so that one horizon read
// before a grace period covers all the domains an unmap touched.
std::atomic<uint64_t> retire_sequence{0};

unsigned levels_for(uint64_t aperture_last) {
  const unsigned bits = std::bit_width(aperture_last);
  if (bits <= kPageShift) return 1;
  return (bits - kPageShift + kBitsPerLevel - 1) / kBitsPerLevel;
}

}  // namespace

Result<std::unique_ptr<PageTable>> PageTable::create(uint64_t aperture_last, uint64_t page_sizes) {
  if ((page_sizes & kPageSize) == 0 || (page_sizes & ~kSupportedPageSizes) != 0) {
    return Error(EINVAL, "page_sizes must include 4 KiB and may add only 2 MiB and 1 GiB");
  }
  std::unique_ptr<PageTable> table(new (std::nothrow)
                                       PageTable(levels_for(aperture_last), page_sizes));
  if (table == nullptr) return Error(ENOMEM, "cannot allocate the page table");
  table->root_ = table->allocate_table();
  if (table->root_ == nullptr) return Error(ENOMEM, "cannot allocate the root page table");
  return table;
}

PageTable::PageTable(unsigned levels, uint64_t page_sizes)
    : levels_(levels),
      page_sizes_(page_sizes),
      covered_last_(level_shift(levels) >= 64 ? UINT64_MAX : level_size(levels) - 1) {}

PageTable::Table* PageTable::allocate_table() noexcept {
  void* memory = pool_.allocate();
  return memory == nullptr ? nullptr : new (memory) Table();
}

PageTable::~PageTable() {
  free_retired(UINT64_MAX);
  if (root_ != nullptr) free_table(root_, levels_ - 1);
}

uint64_t PageTable::retire_horizon() noexcept {
  return retire_sequence.load(std::memory_order_acquire);
}

void PageTable::free_retired(uint64_t horizon) noexcept {
  std::unique_lock lk(structure_mu_);
  Table** link = &retired_;
  while (*link != nullptr) {
    Table* table = *link;
    const auto next = reinterpret_cast<Table*>(table->entries[0].load(std::memory_order_relaxed));
    if ((table->entries[1].load(std::memory_order_relaxed) >> 1) <= horizon) {
      *link = next;
      pool_.release(table);
      table_pages_.fetch_sub(1, std::memory_order_relaxed);
    } else {
      link = reinterpret_cast<Table**>(&table->entries[0]);
    }
  }
}

void PageTable::free_table(Table* table, unsigned level) noexcept {
  if (level > 0) {
    for (auto& slot : table->entries) {
      const uint64_t entry = slot.load(std::memory_order_relaxed);
      if (is_table(entry)) free_table(table_of(entry), level - 1);
    }
  }
  pool_.release(table);
}

bool PageTable::leaf_fits(unsigned level, uint64_t iova, uint64_t address,
                          uint64_t remaining) const noexcept {
  if (level > kMaxLeafLevel || level >= levels_) return false;
  const uint64_t size = level_size(level);
  return (page_sizes_ & size) != 0 && is_aligned(iova, size) && is_aligned(address, size) &&
         remaining >= size;
}

Status PageTable::map(uint64_t iova, uint64_t address, uint64_t length, uint32_t prot,
                      mem::HostAccess host_access) {
  if (length == 0 || !is_aligned(iova | address | length, kPageSize)) {
    return Error(EINVAL, "iova, address and length must be non-zero multiples of 4 KiB");
  }
  uint64_t last = 0;
  uint64_t address_last = 0;
  if (__builtin_add_overflow(iova, length - 1, &last) || last > covered_last_ ||
      __builtin_add_overflow(address, length - 1, &address_last)) {
    return Error(EINVAL, "range does not fit in the page table");
  }
  if ((prot & ~uint32_t{kProtRead | kProtWrite}) != 0) {
    return Error(EINVAL, "unknown protection bits");
  }
  const uint64_t leaf_bits = kPresent | ((prot & kProtRead) != 0 ? kReadable : 0) |
                             ((prot & kProtWrite) != 0 ? kWritable : 0) |
                             (static_cast<uint64_t>(host_access) << kHostAccessShift);
  uint64_t done = 0;
  LeafCounts placed;
  std::shared_lock lk(structure_mu_);
  while (done < length) {
    Result<uint64_t> size =
        map_one_leaf(iova + done, address + done, length - done, leaf_bits, &placed);
    if (!size.ok()) {
      lk.unlock();
      change_counts(placed, CountChange::add);  // the undo subtracts them
      unmap_keeping_tables(iova, done);
      return size.error();
    }
    done += size.value();
  }
  change_counts(placed, CountChange::add);
  return {};
}

void PageTable::change_counts(const LeafCounts& counts, CountChange change) noexcept {
  // Subtracting is adding the two's complement (the counters are unsigned).
  const auto delta = [change](uint64_t n) { return change == CountChange::add ? n : 0 - n; };
  uint64_t bytes = 0;
  for (unsigned level = 0; level <= kMaxLeafLevel; ++level) {
    if (counts.leaves[level] == 0) continue;
    leaves_[level].fetch_add(delta(counts.leaves[level]), std::memory_order_relaxed);
    bytes += counts.leaves[level] * level_size(level);
  }
  if (bytes != 0) mapped_bytes_.fetch_add(delta(bytes), std::memory_order_relaxed);
}

Result<uint64_t> PageTable::map_one_leaf(uint64_t iova, uint64_t address, uint64_t remaining,
                                         uint64_t leaf_bits, LeafCounts* placed) {
  Table* table = root_;
  for (unsigned level = levels_ - 1;; --level) {
    std::atomic<uint64_t>& slot = table->entries[index_at(iova, level)];
    uint64_t entry = slot.load(std::memory_order_acquire);
    // A table already in the slot means part of this span is mapped by
    // someone else: descend and use smaller leaves around it.
    if (entry == 0 && leaf_fits(level, iova, address, remaining) &&
        slot.compare_exchange_strong(entry, address | leaf_bits, std::memory_order_release,
                                     std::memory_order_acquire)) {
      // The leaves after it in this table take the same size (their
      // addresses stay aligned, and no larger leaf fits inside a table).
      // Their spans lie inside this call's range, which no concurrent map
      // overlaps, so a plain store suffices where the first leaf needed a
      // compare-and-swap: a locked instruction per leaf was most of filling
      // 512 leaves. A slot found non-empty ends the run; the next call
      // reports it (EEXIST) or descends into it.
      const uint64_t size = level_size(level);
      uint64_t done = size;
      for (unsigned index = index_at(iova, level) + 1;
           index < kEntriesPerTable && remaining - done >= size; ++index) {
        std::atomic<uint64_t>& next = table->entries[index];
        if (next.load(std::memory_order_relaxed) != 0) break;
        next.store((address + done) | leaf_bits, std::memory_order_release);
        done += size;
      }
      placed->leaves[level] += done / size;
      return done;
    }
    if (entry == 0) {
      Table* fresh = allocate_table();
      if (fresh == nullptr) return Error(ENOMEM, "cannot allocate a page table");
      const uint64_t fresh_entry = reinterpret_cast<uint64_t>(fresh) | kPresent | kIsTable;
      // Concurrent maps of disjoint ranges may race for the same slot; the
      // loser adopts the winner's table.
      if (slot.compare_exchange_strong(entry, fresh_entry, std::memory_order_acq_rel,
                                       std::memory_order_acquire)) {
        table_pages_.fetch_add(1, std::memory_order_relaxed);
        entry = fresh_entry;
      } else {
        pool_.release(fresh);  // never published
      }
    }
    if (!is_table(entry)) return Error(EEXIST, "page table slot already holds a leaf");
    table = table_of(entry);
  }
}

namespace {

// [iova, last] clipped to what the table covers; false if nothing is left.
bool clip(uint64_t iova, uint64_t length, uint64_t covered_last, uint64_t* last) {
  if (length == 0 || iova > covered_last) return false;
  if (__builtin_add_overflow(iova, length - 1, last) || *last > covered_last) *last = covered_last;
  return true;
}

}  // namespace

uint64_t PageTable::unmap_keeping_tables(uint64_t iova, uint64_t length) noexcept {
  uint64_t last = 0;
  if (!clip(iova, length, covered_last_, &last)) return 0;
  LeafCounts counts;
  std::shared_lock lk(structure_mu_);
  const uint64_t cleared = clear_range(root_, levels_ - 1, iova, last, &counts);
  change_counts(counts, CountChange::subtract);
  // After the leaves are cleared, before the caller waits for readers.
  iotlb_.invalidate();
  return cleared;
}

uint64_t PageTable::unmap(uint64_t iova, uint64_t length) noexcept {
  uint64_t last = 0;
  if (!clip(iova, length, covered_last_, &last)) return 0;
  const uint64_t cleared = unmap_keeping_tables(iova, length);
  std::unique_lock lk(structure_mu_);
  retire_empty(root_, levels_ - 1, iova, last);
  return cleared;
}

void PageTable::retire_empty(Table* table, unsigned level, uint64_t first, uint64_t last) noexcept {
  if (level == 0) return;
  const unsigned shift = level_shift(level);
  const unsigned table_shift = shift + kBitsPerLevel;
  const uint64_t table_base = table_shift >= 64 ? 0 : first & ~((uint64_t{1} << table_shift) - 1);
  const unsigned first_index = index_at(first, level);
  const unsigned last_index = index_at(last, level);
  for (unsigned index = first_index; index <= last_index; ++index) {
    std::atomic<uint64_t>& slot = table->entries[index];
    const uint64_t entry = slot.load(std::memory_order_relaxed);
    if (!is_table(entry)) continue;
    Table* child = table_of(entry);
    const uint64_t slot_first = table_base + (uint64_t{index} << shift);
    const uint64_t slot_last = slot_first + (level_size(level) - 1);
    retire_empty(child, level - 1, index == first_index ? first : slot_first,
                 index == last_index ? last : slot_last);
    bool empty = true;
    for (const auto& e : child->entries) {
      if (e.load(std::memory_order_relaxed) != 0) {
        empty = false;
        break;
      }
    }
    if (!empty) continue;
    slot.store(0, std::memory_order_release);
    const uint64_t sequence = retire_sequence.fetch_add(1, std::memory_order_acq_rel) + 1;
    child->entries[0].store(reinterpret_cast<uint64_t>(retired_), std::memory_order_relaxed);
    child->entries[1].store(sequence << 1, std::memory_order_relaxed);
    retired_ = child;
  }
}

// [first, last] lies within the span of table. A leaf only partly inside the
// range is cleared whole: leaving a translation to memory the caller is
// about to release would be worse than dropping a neighbour's.
uint64_t PageTable::clear_range(Table* table, unsigned level, uint64_t first, uint64_t last,
                                LeafCounts* cleared_leaves) noexcept {
  const unsigned shift = level_shift(level);
  const unsigned table_shift = shift + kBitsPerLevel;
  const uint64_t table_base = table_shift >= 64 ? 0 : first & ~((uint64_t{1} << table_shift) - 1);
  const unsigned first_index = index_at(first, level);
  const unsigned last_index = index_at(last, level);
  uint64_t cleared = 0;
  for (unsigned index = first_index; index <= last_index; ++index) {
    std::atomic<uint64_t>& slot = table->entries[index];
    const uint64_t entry = slot.load(std::memory_order_acquire);
    if (entry == 0) continue;
    if (is_table(entry)) {
      const uint64_t slot_first = table_base + (uint64_t{index} << shift);
      const uint64_t slot_last = slot_first + (level_size(level) - 1);
      cleared += clear_range(table_of(entry), level - 1, index == first_index ? first : slot_first,
                             index == last_index ? last : slot_last, cleared_leaves);
      continue;
    }
    slot.store(0, std::memory_order_release);
    ++cleared_leaves->leaves[level];
    cleared += level_size(level);
  }
  return cleared;
}

bool PageTable::lookup_run(uint64_t iova, uint64_t max_bytes, Leaf* out) const noexcept {
  if (iova > covered_last_) return false;
  const Table* table = root_;
  for (unsigned level = levels_ - 1;; --level) {
    const unsigned index = index_at(iova, level);
    const uint64_t entry = table->entries[index].load(std::memory_order_acquire);
    if ((entry & kPresent) == 0) return false;
    if (is_table(entry)) {
      table = table_of(entry);
      continue;
    }
    const uint64_t size = level_size(level);
    const uint64_t offset = iova & (size - 1);
    uint64_t run = size - offset;
    uint64_t next_entry = entry + size;
    for (unsigned next = index + 1; run < max_bytes && next < kEntriesPerTable; ++next) {
      // next_entry < entry: the address wrapped, which no real run does.
      if (next_entry < entry ||
          table->entries[next].load(std::memory_order_acquire) != next_entry) {
        break;
      }
      run += size;
      next_entry += size;
    }
    *out = leaf_of(entry, level, iova);
    out->remaining = run;
    return true;
  }
}

PageTableCounters PageTable::counters() const noexcept {
  return PageTableCounters{
      .mapped_bytes = mapped_bytes_.load(std::memory_order_relaxed),
      .leaves_4k = leaves_[0].load(std::memory_order_relaxed),
      .leaves_2m = leaves_[1].load(std::memory_order_relaxed),
      .leaves_1g = leaves_[2].load(std::memory_order_relaxed),
      .table_pages = table_pages_.load(std::memory_order_relaxed),
  };
}

}  // namespace iomm::domain
