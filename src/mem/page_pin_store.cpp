// MemObject::pin_pages / unpin_pages: pins counted per 4 KiB page (an
// access's per-page pins), next to the segment counts of pin_store.cpp.
//
// A run of pages pinned by one call is counted page by page in PageCounts
// (a bit per page, counts only above 1), so dropping any page of it later
// needs no allocation and a lone page costs no segment. The protocol is
// pin()'s (see pin_store.cpp): under mu_, wait until nothing else works on
// the range, make the counts ready (the only allocation), charge the owner
// for the granules neither of its counts holds, raise the counts; without
// mu_, lock the granules no count held before; under mu_, finish or undo.
// While a call works without mu_, its range is listed in page_ops_ (a node
// on its own stack) and every other pin or unpin touching it waits.
#include <algorithm>
#include <array>
#include <new>

#include "acct/owner.hpp"
#include "core/check.hpp"
#include "fault/inject.hpp"
#include "mem/mem_object.hpp"

namespace iomm::mem {

namespace {

// Call f(lo, hi) for each maximal part of [first, last] where counts (if
// any) has no non-zero segment; stop when f returns false.
template <typename F>
void for_each_zero_zone(const IntervalCounts* counts, uint64_t first, uint64_t last, F&& f) {
  uint64_t g = first;
  if (counts != nullptr) {
    const auto& segs = counts->segments();
    auto it = segs.upper_bound(first);
    if (it != segs.begin()) --it;
    for (; g <= last && it != segs.end() && it->first <= last; ++it) {
      if (it->second.last < g) continue;
      if (it->first > g && !f(g, it->first - 1)) return;
      const uint64_t hi = std::min(it->second.last, last);
      if (it->second.count == 0 && !f(std::max(it->first, g), hi)) return;
      g = hi + 1;
    }
  }
  if (g <= last) f(g, last);
}

// How many granules of the zero zones of counts in [first, last] have no
// count in pages.
uint64_t zeros_in_zero_zones(const IntervalCounts* counts, const PageCounts& pages, uint64_t first,
                             uint64_t last) {
  uint64_t n = 0;
  for_each_zero_zone(counts, first, last, [&](uint64_t lo, uint64_t hi) {
    n += hi - lo + 1 - pages.count_nonzero(lo, hi);
    return true;
  });
  return n;
}

// The owner's segment charges, if it has any.
template <typename Map>
const IntervalCounts* counts_of(const Map& charged, acct::Owner* owner) {
  auto it = charged.find(owner);
  return it == charged.end() ? nullptr : &it->second;
}

}  // namespace

uint32_t MemObject::pages_in(uint64_t granule, uint64_t offset, uint64_t length) const noexcept {
  const uint64_t start = std::max(granule << page_shift_, offset);
  const uint64_t end = std::min((granule + 1) << page_shift_, offset + length);
  return static_cast<uint32_t>((end - start) >> kPageShift);
}

template <typename F>
bool MemObject::each_span(uint64_t from, uint64_t to, uint64_t offset, uint64_t length,
                          F&& f) const {
  const uint64_t first = offset >> page_shift_;
  const uint64_t last = (offset + length - 1) >> page_shift_;
  const auto whole = static_cast<uint32_t>(granule_pages());
  uint64_t lo = from;
  if (const uint32_t head = pages_in(first, offset, length); lo == first && head != whole) {
    if (!f(lo, lo, head)) return false;
    if (lo == to) return true;
    ++lo;
  }
  const uint32_t tail = pages_in(last, offset, length);
  const bool cut_tail = to == last && tail != whole;
  if (cut_tail && lo == last) return f(lo, lo, tail);
  if (!f(lo, cut_tail ? last - 1 : to, whole)) return false;
  return !cut_tail || f(last, last, tail);
}

size_t MemObject::collect_page_runs(uint64_t from, uint64_t last, uint64_t offset, uint64_t length,
                                    bool raised, std::span<Range> runs) const noexcept {
  size_t n = 0;
  for_each_zero_zone(&physical_, from, last, [&](uint64_t zone_lo, uint64_t zone_hi) {
    return each_span(zone_lo, zone_hi, offset, length,
                     [&](uint64_t lo, uint64_t hi, uint32_t pages) {
                       const uint32_t want = raised ? pages : 0;
                       for (uint64_t g = paged_.next_count(lo, hi, want, true); g <= hi;) {
                         const uint64_t end = paged_.next_count(g, hi, want, false) - 1;
                         if (!append_run(runs, n, g, end)) return false;
                         g = paged_.next_count(end + 1, hi, want, true);
                       }
                       return true;
                     });
  });
  return n;
}

// Unlock, in batches and without mu_, the granules of [first, last] that no
// count holds any more. Enters and leaves with lk held and the range listed
// in page_ops_; never allocates.
void MemObject::finish_page_unlock(uint64_t first, uint64_t last, uint64_t offset, uint64_t length,
                                   std::unique_lock<sync::RankedMutex>& lk) noexcept {
  for (uint64_t cursor = first; cursor <= last;) {
    std::array<Range, kRunBatch> runs{};
    const size_t n = collect_page_runs(cursor, last, offset, length, false, runs);
    if (n == 0) return;
    lk.unlock();
    for (size_t i = 0; i < n; ++i) unlock_granules(runs[i].first, runs[i].last);
    lk.lock();
    cursor = runs[n - 1].last + 1;
  }
}

MemObject::PageCall MemObject::begin_page_call(acct::Owner* owner, uint64_t offset, uint64_t length,
                                               std::unique_lock<sync::RankedMutex>& lk) noexcept {
  IOMM_CHECK(length > 0 && (offset | length) % kPageSize == 0, "page call not page aligned");
  const uint64_t first = offset >> page_shift_;
  const uint64_t last = (offset + length - 1) >> page_shift_;
  lk = std::unique_lock(mu_);
  unpended_.wait(
      lk, [&] { return !physical_.any_pending(first, last) && !page_op_overlaps(first, last); });
  return {first, last, charged() ? owner : nullptr};
}

Status MemObject::pin_pages(acct::Owner* owner, uint64_t offset, uint64_t length, bool write) {
  std::unique_lock<sync::RankedMutex> lk;
  // Named, not a structured binding: lambdas below capture them, which
  // clang before 16 (the fuzz build's) rejects for bindings.
  const PageCall call = begin_page_call(owner, offset, length, lk);
  const uint64_t first = call.first;
  const uint64_t last = call.last;
  acct::Owner* const payer = call.payer;
  const auto most = static_cast<uint32_t>(std::min(granule_pages(), length >> kPageShift));

  PageCounts* charges = nullptr;
  auto trim = [&] {
    paged_.trim(first, last);
    if (charges != nullptr) {
      charges->trim(first, last);
      if (charges->empty()) paged_charged_.erase(payer);
    }
  };
  try {
    if (IOMM_INJECT("mem.pin_pages_bookkeeping")) throw std::bad_alloc();
    paged_.prepare(first, last, most);
    if (payer != nullptr) {
      charges = &paged_charged_[payer];
      charges->prepare(first, last, most);
    }
  } catch (const std::bad_alloc&) {
    trim();
    return Error(ENOMEM, "out of memory for pin bookkeeping");
  }

  // Counted before the counts rise: the granules this owner is charged for
  // by neither count yet, and those no count locks yet.
  uint64_t fresh_charges = 0;
  if (charges != nullptr) {
    fresh_charges = zeros_in_zero_zones(counts_of(charged_, payer), *charges, first, last);
    if (Status st = payer->charge(fresh_charges * granule_pages()); !st) {
      trim();
      return st;
    }
  }
  const uint64_t newly_locked = zeros_in_zero_zones(&physical_, paged_, first, last);
  // Raise this call's counts, or lower them again to undo it.
  auto change_counts = [&](bool raise) {
    each_span(first, last, offset, length, [&](uint64_t lo, uint64_t hi, uint32_t pages) {
      for (PageCounts* c : {&paged_, charges}) {
        if (c == nullptr) continue;
        if (raise) {
          c->add_range(lo, hi, pages);
        } else {
          c->sub_range(lo, hi, pages);
        }
      }
      return true;
    });
  };
  change_counts(true);

  PageOp op{first, last, page_ops_};
  page_ops_ = &op;
  auto unlist = [&] {
    PageOp** p = &page_ops_;
    while (*p != &op) p = &(*p)->next;
    *p = op.next;
  };

  uint64_t failed_at = last + 1;  // first granule not locked on failure
  Status result =
      lock_runs(first, last, write, lk, &failed_at, [&](uint64_t cursor, std::span<Range> runs) {
        return collect_page_runs(cursor, last, offset, length, true, runs);
      });
  // Granules another pin had locked were made resident for its access, not
  // necessarily for writing.
  if (result && write && newly_locked < last - first + 1) {
    lk.unlock();
    result = confirm_writable(first, last);
    lk.lock();
  }

  if (result) {
    account_physical(newly_locked, true);
  } else {
    // Undo exactly this call: lower its counts, unlock what it locked (the
    // granules before failed_at that no count holds again), return its
    // charge.
    change_counts(false);
    if (failed_at > first) finish_page_unlock(first, failed_at - 1, offset, length, lk);
    trim();
    if (charges != nullptr) payer->uncharge(fresh_charges * granule_pages());
  }
  unlist();
  unpended_.notify_all();
  return result;
}

void MemObject::unpin_pages(acct::Owner* owner, uint64_t offset, uint64_t length) noexcept {
  std::unique_lock<sync::RankedMutex> lk;
  const PageCall call = begin_page_call(owner, offset, length, lk);
  const uint64_t first = call.first;
  const uint64_t last = call.last;
  acct::Owner* const payer = call.payer;

  PageCounts* charges = nullptr;
  if (payer != nullptr) {
    auto it = paged_charged_.find(payer);
    IOMM_CHECK(it != paged_charged_.end(), "page unpin without a charge");
    charges = &it->second;
  }
  each_span(first, last, offset, length, [&](uint64_t lo, uint64_t hi, uint32_t pages) {
    paged_.sub_range(lo, hi, pages);
    if (charges != nullptr) charges->sub_range(lo, hi, pages);
    return true;
  });
  // Every granule of the range was held, so a zero count now is one this
  // call dropped.
  const uint64_t released = zeros_in_zero_zones(&physical_, paged_, first, last);
  uint64_t uncharged = 0;
  if (charges != nullptr) {
    uncharged = zeros_in_zero_zones(counts_of(charged_, payer), *charges, first, last);
    if (charges->empty()) paged_charged_.erase(payer);
  }

  if (released != 0) {
    PageOp op{first, last, page_ops_};
    page_ops_ = &op;
    finish_page_unlock(first, last, offset, length, lk);
    PageOp** p = &page_ops_;
    while (*p != &op) p = &(*p)->next;
    *p = op.next;
    account_physical(released, false);
  }
  // Memory first, then the charge (teardown order).
  if (payer != nullptr) payer->uncharge(uncharged * granule_pages());
  unpended_.notify_all();
}

}  // namespace iomm::mem
