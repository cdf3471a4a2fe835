// MemObject::pin / unpin: physical pins and per-owner charges over the
// object's pages.
//
// Protocol (see docs/design.md, "Pinning"):
// - Under mu_: wait until no segment in range is pending; make the range's
//   segment boundaries exist (the only allocation); charge the owner for the
//   pages its count takes from 0 to 1 (compare-and-swap against the limit:
//   never over, even transiently); raise the counts and mark the physical
//   segments that went 0 -> 1 as pending under this call's op id.
// - Without mu_: populate + mlock each pending run (syscalls may be slow; other
//   ranges proceed meanwhile); a write pin also confirms that the granules
//   other pins had locked can be written.
// - Under mu_ again: clear pending and wake waiters; on failure undo exactly
//   what this call did.
// Unpin mirrors it, releasing memory before returning the charge, and needs
// no allocation because pin left the boundaries in place.
// Granules that also have a page count (pin_pages, page_pin_store.cpp) are
// locked and charged by that side: the segment side neither counts them as
// newly pinned or charged nor locks or unlocks them, and waits while a page
// call works on its range.
#include <algorithm>
#include <array>
#include <atomic>
#include <new>

#include "acct/owner.hpp"
#include "core/check.hpp"
#include "fault/inject.hpp"
#include "mem/mem_object.hpp"
#include "stats/shared_counters.hpp"

namespace iomm::mem {

namespace {

// Kept in the shared counter block so monitors in other processes can read
// them; reached through a call so the block is only created once pinning starts.
std::atomic<uint64_t>& pinned_pages() { return stats::shared_counters().pinned_pages; }
std::atomic<uint64_t>& simulated_pinned_pages() {
  return stats::shared_counters().simulated_pinned_pages;
}

}  // namespace

PinCounters pin_counters() noexcept {
  return {pinned_pages().load(std::memory_order_relaxed) * kPageSize,
          simulated_pinned_pages().load(std::memory_order_relaxed) * kPageSize};
}

int pin_errno(int syscall_errno) noexcept {
  // MADV_POPULATE_* says ENOMEM for an unmapped range and EINVAL for a
  // VM_PFNMAP/VM_IO one; both are a bad address to the caller, as in GUP.
  switch (syscall_errno) {
    case ENOMEM:
    case EINVAL:
    case EFAULT:
      return EFAULT;
    case EAGAIN:
      return ENOMEM;
    default:
      return syscall_errno;
  }
}

void MemObject::account_physical(uint64_t granules, bool pinned) const noexcept {
  const uint64_t pages = granules << (page_shift_ - kPageShift);
  auto& counter = synthetic() ? simulated_pinned_pages() : pinned_pages();
  if (pinned) {
    counter.fetch_add(pages, std::memory_order_relaxed);
  } else {
    counter.fetch_sub(pages, std::memory_order_relaxed);
  }
}

size_t MemObject::collect_runs(uint64_t op, uint64_t first, uint64_t last,
                               std::span<Range> runs) const noexcept {
  size_t n = 0;
  const auto& segs = physical_.segments();
  auto it = segs.upper_bound(first);
  if (it != segs.begin()) --it;
  for (; it != segs.end() && it->first <= last; ++it) {
    if (it->second.pending_op != op || it->second.last < first) continue;
    const uint64_t hi = std::min(it->second.last, last);
    for (uint64_t g = std::max(it->first, first); g <= hi;) {
      const uint64_t lo = paged_.empty() ? g : paged_.next(g, hi, true);
      if (lo > hi) break;
      const uint64_t end = paged_.empty() ? hi : paged_.next(lo, hi, false) - 1;
      if (!append_run(runs, n, lo, end)) return n;
      g = end + 1;
    }
  }
  return n;
}

uint64_t MemObject::paged_where(const IntervalCounts& counts, const PageCounts* pages,
                                uint64_t first, uint64_t last, uint64_t count) noexcept {
  if (pages == nullptr || pages->empty()) return 0;
  uint64_t n = 0;
  for (auto it = counts.segments().lower_bound(first);
       it != counts.segments().end() && it->first <= last; ++it) {
    if (it->second.count != count) continue;
    n += pages->count_nonzero(it->first, std::min(it->second.last, last));
  }
  return n;
}

bool MemObject::page_op_overlaps(uint64_t first, uint64_t last) const noexcept {
  for (const PageOp* p = page_ops_; p != nullptr; p = p->next) {
    if (p->first <= last && first <= p->last) return true;
  }
  return false;
}

Status MemObject::pin(acct::Owner* owner, uint64_t offset, uint64_t length, bool write) {
  IOMM_CHECK(length > 0, "empty pin range");
  const uint64_t first = offset >> page_shift_;
  const uint64_t last = (offset + length - 1) >> page_shift_;
  const uint64_t granule_pages = 1ULL << (page_shift_ - kPageShift);
  if (!charged()) owner = nullptr;

  std::unique_lock lk(mu_);
  unpended_.wait(
      lk, [&] { return !physical_.any_pending(first, last) && !page_op_overlaps(first, last); });

  IntervalCounts* charges = nullptr;
  try {
    if (IOMM_INJECT("mem.pin_bookkeeping")) throw std::bad_alloc();
    physical_.cover(first, last);
    if (owner != nullptr) {
      charges = &charged_[owner];
      charges->cover(first, last);
    }
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory for pin bookkeeping");
  }

  const PageCounts* paged_charges = nullptr;
  if (charges != nullptr) {
    if (auto it = paged_charged_.find(owner); it != paged_charged_.end()) {
      paged_charges = &it->second;
    }
    const uint64_t fresh =
        charges->zero_pages(first, last) - paged_where(*charges, paged_charges, first, last, 0);
    if (Status st = owner->charge(fresh * granule_pages); !st) {
      charges->erase_zeros(first, last);
      if (charges->empty()) charged_.erase(owner);
      physical_.erase_zeros(first, last);
      return st;
    }
    charges->add(first, last, +1, 0);
  }
  const uint64_t op = next_op_++;
  const uint64_t newly_pinned =
      physical_.add(first, last, +1, op) - paged_where(physical_, &paged_, first, last, 1);

  // Lock every run this op moved from 0 to 1, without mu_. The pending marks
  // keep those segments ours while the rest of the map changes.
  uint64_t failed_at = last + 1;  // first granule not locked on failure
  Status result = lock_runs(
      first, last, write, lk, &failed_at,
      [&](uint64_t cursor, std::span<Range> runs) { return collect_runs(op, cursor, last, runs); });
  // Granules another pin had locked were made resident for its access, not
  // necessarily for writing (a read-only mapping of the same pages).
  if (result && write && newly_pinned < last - first + 1) {
    lk.unlock();
    result = confirm_writable(first, last);
    lk.lock();
  }

  if (result) {
    for (auto it = physical_.segments().lower_bound(first);
         it != physical_.segments().end() && it->first <= last; ++it) {
      if (it->second.pending_op == op) it->second.pending_op = 0;
    }
    account_physical(newly_pinned, true);
  } else {
    // Undo exactly this call: runs past the failure were never locked; the
    // ones before it are unlocked like an unpin would.
    physical_.add(first, last, -1, 0);
    for (auto it = physical_.segments().lower_bound(failed_at);
         it != physical_.segments().end() && it->first <= last; ++it) {
      if (it->second.pending_op == op) it->second.pending_op = 0;
    }
    if (failed_at > first) finish_unlock(op, first, failed_at - 1, lk);
    physical_.erase_zeros(first, last);
    if (charges != nullptr) {
      const uint64_t crossed = charges->add(first, last, -1, 0);
      const uint64_t released =
          (crossed - paged_where(*charges, paged_charges, first, last, 0)) * granule_pages;
      charges->erase_zeros(first, last);
      if (charges->empty()) charged_.erase(owner);
      owner->uncharge(released);
    }
  }
  unpended_.notify_all();
  return result;
}

void MemObject::unpin(acct::Owner* owner, uint64_t offset, uint64_t length) noexcept {
  IOMM_CHECK(length > 0, "empty unpin range");
  const uint64_t first = offset >> page_shift_;
  const uint64_t last = (offset + length - 1) >> page_shift_;
  if (!charged()) owner = nullptr;

  std::unique_lock lk(mu_);
  unpended_.wait(lk, [&] { return !page_op_overlaps(first, last); });
  const uint64_t op = next_op_++;
  const uint64_t released =
      physical_.add(first, last, -1, op) - paged_where(physical_, &paged_, first, last, 0);
  finish_unlock(op, first, last, lk);
  account_physical(released, false);

  // Memory first, then the charge (teardown order).
  if (owner != nullptr) {
    auto it = charged_.find(owner);
    IOMM_CHECK(it != charged_.end(), "unpin without a charge");
    const uint64_t granule_pages = 1ULL << (page_shift_ - kPageShift);
    const PageCounts* paged_charges = nullptr;
    if (auto p = paged_charged_.find(owner); p != paged_charged_.end()) paged_charges = &p->second;
    const uint64_t crossed = it->second.add(first, last, -1, 0);
    const uint64_t uncharged =
        (crossed - paged_where(it->second, paged_charges, first, last, 0)) * granule_pages;
    it->second.erase_zeros(first, last);
    if (it->second.empty()) charged_.erase(it);
    owner->uncharge(uncharged);
  }
  unpended_.notify_all();
}

// Unlock, in batches and without mu_, every run this op took to zero (but
// granules with a page count), then erase those segments. Enters and leaves
// with lk held; never allocates.
void MemObject::finish_unlock(uint64_t op, uint64_t first, uint64_t last,
                              std::unique_lock<sync::RankedMutex>& lk) noexcept {
  for (uint64_t cursor = first; cursor <= last;) {
    std::array<Range, kRunBatch> runs{};
    const size_t n = collect_runs(op, cursor, last, runs);
    if (n == 0) break;
    lk.unlock();
    for (size_t i = 0; i < n; ++i) unlock_granules(runs[i].first, runs[i].last);
    lk.lock();
    cursor = runs[n - 1].last + 1;
  }
  auto& segs = physical_.segments();
  auto it = segs.upper_bound(first);
  if (it != segs.begin()) --it;
  while (it != segs.end() && it->first <= last) {
    if (it->second.pending_op == op && it->second.last >= first) {
      IOMM_CHECK(it->second.count == 0, "failed pin unwinds a segment it does not own");
      it = segs.erase(it);
    } else {
      ++it;
    }
  }
  unpended_.notify_all();
}

}  // namespace iomm::mem
