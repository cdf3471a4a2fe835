// Per-page reference-counted pins of an access (see include/iomm/access.hpp).
#include <algorithm>
#include <cstddef>
#include <new>
#include <vector>

#include "access/access_state.hpp"
#include "fault/inject.hpp"
#include "ioas/ioas_state.hpp"
#include "iomm/access.hpp"

namespace iomm {

using access::AccessState;
using ioas::Area;
using ioas::AreaState;
using ioas::IoasState;

namespace access {

namespace {

constexpr uint64_t kLastPage = UINT64_MAX >> kPageShift;

// The area containing iova (tree_mu held), or nullptr.
const Area* area_at(const IoasState& st, uint64_t iova) {
  auto it = st.areas.upper_bound(iova);
  if (it == st.areas.begin()) return nullptr;
  --it;
  return it->second->range.last >= iova ? it->second.get() : nullptr;
}

// Releases the backing pins of pages whose count fell to zero, one pin store
// call per run of consecutive pages of one area. Never allocates.
class RunReleaser {
 public:
  RunReleaser() = default;
  RunReleaser(const RunReleaser&) = delete;
  RunReleaser& operator=(const RunReleaser&) = delete;
  ~RunReleaser() { flush(); }

  // Pages [iova, + pages) of area a (nullptr: none to release).
  void add(const Area* a, uint64_t iova, uint64_t pages = 1) noexcept {
    if (a != nullptr && a == area_ && iova == start_ + (pages_ << kPageShift)) {
      pages_ += pages;
      return;
    }
    flush();
    if (a == nullptr) return;
    area_ = a;
    start_ = iova;
    pages_ = pages;
  }
  void flush() noexcept {
    if (pages_ == 0) return;
    area_->source.object()->unpin_pages(area_->owner.get(), area_->backing_offset(start_),
                                        pages_ << kPageShift);
    area_->access_pins.fetch_sub(pages_, std::memory_order_release);
    pages_ = 0;
    area_ = nullptr;
  }

 private:
  const Area* area_ = nullptr;
  uint64_t start_ = 0;
  uint64_t pages_ = 0;
};

// Release the pages [first, last] (page indices) whose count fell to zero:
// one run per area they lie in, looked up from the last area seen.
void release_run(const IoasState& st, const Area*& area, RunReleaser& rel, uint64_t first,
                 uint64_t last) noexcept {
  for (uint64_t page = first; page <= last;) {
    const uint64_t iova = page << kPageShift;
    if (area == nullptr || iova < area->range.start || iova > area->range.last) {
      area = area_at(st, iova);
    }
    const uint64_t n =
        area == nullptr ? 1 : std::min(last - page, (area->range.last - iova) >> kPageShift) + 1;
    rel.add(area, iova, n);
    page += n;
  }
}

// Pages of one pin_pages call in one area, consecutive, either all at count
// zero when checked (fresh: the call pins them) or all above (raised).
struct PageRun {
  const Area* area;
  uint64_t first;  // index of its first page in the call
  uint64_t pages;
  bool fresh;
};

}  // namespace

bool AccessState::page_pins_overlap(const IovaRange& r) const {
  std::lock_guard lk(page_mu);
  return page_counts.any_nonzero(r.start >> kPageShift, r.last >> kPageShift);
}

void release_all_page_pins(AccessState& a) noexcept {
  std::lock_guard lk(a.page_mu);
  if (a.page_counts.empty()) return;
  IoasState& st = ioas::state_of(*a.ioas);
  std::shared_lock tree(st.tree_mu);
  {
    RunReleaser rel;
    const Area* area = nullptr;
    a.page_counts.for_each_nonzero(0, kLastPage, [&](uint64_t page) {
      const uint64_t iova = page << kPageShift;
      if (area == nullptr || iova < area->range.start || iova > area->range.last) {
        area = area_at(st, iova);
      }
      rel.add(area, iova);
    });
  }
  a.page_counts.clear();
  a.page_pins.store(0, std::memory_order_release);
}

void collect_pinned(const AccessState& a, uint64_t first_page, uint64_t npages,
                    std::span<uint64_t> out) {
  if (npages == 0) return;
  const uint64_t last_page = first_page + npages - 1;
  auto set = [&](uint64_t page) {
    if (page < first_page || page > last_page) return;
    const uint64_t i = page - first_page;
    if ((i >> 6) < out.size()) out[i >> 6] |= uint64_t{1} << (i & 63);
  };
  {
    std::lock_guard lk(a.mu);
    for (const auto& [iova, record] : a.pins) {
      const uint64_t p0 = iova >> kPageShift;
      const uint64_t p1 = (iova + record.length - 1) >> kPageShift;
      for (uint64_t p = std::max(p0, first_page); p <= std::min(p1, last_page); ++p) set(p);
    }
  }
  std::lock_guard lk(a.page_mu);
  a.page_counts.for_each_nonzero(first_page, last_page, set);
}

}  // namespace access

// Three steps, so that page_mu (which unmap notification and dirty reads
// take) is never held while pages are locked:
// 1. Under page_mu and tree_mu (shared): check every area of the range and
//    split it into runs of pages of one area that are all pinned already or
//    all at count 0. Raise the counts of the first kind, a word of the
//    bitmap at a time; for the second raise their area's access_pins and
//    pins_in_flight. Hold the count blocks of the range busy so a concurrent
//    unpin cannot free them.
// 2. Without locks: pin each run at count 0, one pin store call per run.
// 3. Under page_mu: commit (a page another call pinned meanwhile keeps that
//    pin and ours is dropped) or undo, and release the blocks.
Status Access::pin_pages(uint64_t iova, uint64_t npages, uint32_t prot, void** host) {
  if (npages == 0) return Error(EINVAL, "zero pages");
  if (host == nullptr) return Error(EINVAL, "no array for the host addresses");
  if (!is_aligned(iova, kPageSize)) return Error(EINVAL, "iova must be page aligned");
  if ((prot & ~(kProtRead | kProtWrite)) != 0 || prot == 0) return Error(EINVAL, "bad prot");
  if (npages > (UINT64_MAX >> kPageShift) || !make_range(iova, npages << kPageShift)) {
    return Error(EOVERFLOW, "iova + length wraps");
  }
  AccessState& as = *state_;
  IoasState& st = ioas::state_of(*as.ioas);
  // Lands (unlinks) once step 3 has committed or undone the counts.
  const access::Flight flight(as, {iova, iova + (npages << kPageShift) - 1});

  const uint64_t first_page = iova >> kPageShift;
  const uint64_t last_page = first_page + npages - 1;
  auto page_iova = [&](uint64_t i) { return iova + (i << kPageShift); };
  mem::PageCounts& counts = as.page_counts;
  std::vector<access::PageRun> runs;
  uint64_t fresh_pages = 0;
  bool held = false;  // the blocks of the range are held busy
  // Undo step 1 for the runs recorded, page_mu held. No page reaches count
  // 0 here, because nothing else changed the counts since step 1.
  auto undo_checked = [&] {
    for (const access::PageRun& r : runs) {
      if (r.fresh) {
        r.area->access_pins.fetch_sub(r.pages, std::memory_order_release);
        r.area->pins_in_flight.fetch_sub(r.pages, std::memory_order_release);
      } else {
        counts.sub_range(first_page + r.first, first_page + r.first + r.pages - 1);
      }
    }
    if (held) counts.release_blocks(first_page, last_page);
    counts.trim(first_page, last_page);
    if (fresh_pages != 0) st.note_flight_exit();
  };

  std::unique_lock pl(as.page_mu);
  try {
    if (IOMM_INJECT("access.alloc_page_pins")) throw std::bad_alloc();
    counts.prepare(first_page, last_page);
    counts.hold_blocks(first_page, last_page);
    held = true;
    std::shared_lock tree(st.tree_mu);
    for (uint64_t i = 0; i < npages;) {
      const uint64_t at = page_iova(i);
      const Area* a = access::area_at(st, at);
      Status bad;
      if (a == nullptr || a->state == AreaState::filling) {
        bad = Error(ENOENT, "page is not mapped");
      } else if (a->state == AreaState::removing) {
        bad = Error(EINVAL, "range is being unmapped");
      } else if (a->host_invalid) {
        bad = Error(EBUSY, "the host address of the range is being updated");
      } else if (a->demand != nullptr) {
        bad = Error(EINVAL, "an on-demand mapping cannot be pinned");
      } else if ((a->prot & prot) != prot) {
        bad = Error(EPERM, "mapping does not allow this access");
      } else if (a->source.object()->synthetic()) {
        bad = Error(ENXIO, "no memory behind a simulated mapping");
      }
      if (!bad) {
        undo_checked();
        return bad;
      }
      const uint64_t area_last =
          first_page + std::min(npages - 1, i + ((a->range.last - at) >> kPageShift));
      while (first_page + i <= area_last) {
        const uint64_t page = first_page + i;
        const bool fresh = counts.get(page) == 0;
        const uint64_t end = counts.next(page, area_last, !fresh);  // first page of the other kind
        runs.push_back({a, i, end - page, fresh});  // recorded before counted: undo sees it
        if (fresh) {
          a->access_pins.fetch_add(end - page, std::memory_order_acq_rel);
          a->pins_in_flight.fetch_add(end - page, std::memory_order_acq_rel);
          fresh_pages += end - page;
        } else {
          counts.add_range(page, end - 1);
        }
        i = end - first_page;
      }
    }
  } catch (const std::bad_alloc&) {
    undo_checked();
    return Error(ENOMEM, "out of memory");
  }
  pl.unlock();

  // Step 2. The areas are held by the access_pins raised above.
  size_t failed_run = runs.size();  // on failure: fresh runs before it are pinned
  Status result;
  for (size_t k = 0; k < runs.size() && result; ++k) {
    const access::PageRun& r = runs[k];
    if (!r.fresh) continue;
    result = r.area->source.object()->pin_pages(r.area->owner.get(),
                                                r.area->backing_offset(page_iova(r.first)),
                                                r.pages << kPageShift, (prot & kProtWrite) != 0);
    if (!result) failed_run = k;
  }

  // Step 3.
  pl.lock();
  if (result) {
    try {
      // Pages another call pinned meanwhile may now need a count above 1.
      if (IOMM_INJECT("access.commit_page_pins")) throw std::bad_alloc();
      counts.prepare(first_page, last_page);
    } catch (const std::bad_alloc&) {
      result = Error(ENOMEM, "out of memory");
    }
  }
  uint64_t counted = 0;  // pages whose count this call took from 0
  uint64_t dropped = 0;  // on failure: pages whose count fell back to 0
  {
    access::RunReleaser rel;
    for (size_t k = 0; k < runs.size(); ++k) {
      const access::PageRun& r = runs[k];
      const uint64_t lo = first_page + r.first;
      const uint64_t hi = lo + r.pages - 1;
      if (!r.fresh) {
        if (result) continue;
        // Another call may have dropped its own count meanwhile.
        dropped += counts.sub_range(lo, hi, 1, [&](uint64_t zlo, uint64_t zhi) {
          rel.add(r.area, page_iova(zlo - first_page), zhi - zlo + 1);
        });
        continue;
      }
      // Pages leave flight before their area's access_pins can drop.
      r.area->pins_in_flight.fetch_sub(r.pages, std::memory_order_acq_rel);
      if (!result) {
        if (k < failed_run) {
          rel.add(r.area, page_iova(r.first), r.pages);
        } else {
          r.area->access_pins.fetch_sub(r.pages, std::memory_order_release);
        }
        continue;
      }
      // Pages pinned by another call meanwhile: ours of them is dropped.
      for (uint64_t p = counts.next(lo, hi, false); p <= hi;) {
        const uint64_t end = counts.next(p, hi, true);
        rel.add(r.area, page_iova(p - first_page), end - p);
        p = counts.next(end, hi, false);
      }
      counted += counts.add_range(lo, hi);
    }
  }
  if (result) {
    // One host() per run: an object's host addresses are contiguous.
    for (const access::PageRun& r : runs) {
      auto* base = static_cast<std::byte*>(
          r.area->source.object()->host(r.area->backing_offset(page_iova(r.first))));
      for (uint64_t j = 0; j < r.pages; ++j) host[r.first + j] = base + (j << kPageShift);
    }
    as.page_pins.fetch_add(counted, std::memory_order_acq_rel);
  } else {
    as.page_pins.fetch_sub(dropped, std::memory_order_acq_rel);
  }
  counts.release_blocks(first_page, last_page);
  counts.trim(first_page, last_page);
  pl.unlock();
  if (fresh_pages != 0) st.note_flight_exit();
  return result;
}

Status Access::unpin_pages(uint64_t iova, uint64_t npages) {
  if (npages == 0) return Error(EINVAL, "zero pages");
  if (!is_aligned(iova, kPageSize)) return Error(EINVAL, "iova must be page aligned");
  if (npages > (UINT64_MAX >> kPageShift) || !make_range(iova, npages << kPageShift)) {
    return Error(EOVERFLOW, "iova + length wraps");
  }
  AccessState& as = *state_;
  const uint64_t first_page = iova >> kPageShift;
  const uint64_t last_page = first_page + npages - 1;
  std::lock_guard pl(as.page_mu);
  // Check every page first: all-or-nothing.
  if (as.page_counts.next(first_page, last_page, true) <= last_page) {
    return Error(EINVAL, "page is not pinned");
  }
  const IoasState& st = ioas::state_of(*as.ioas);
  std::shared_lock tree(st.tree_mu);
  const Area* a = nullptr;
  uint64_t released = 0;
  {
    access::RunReleaser rel;
    released = as.page_counts.sub_range(first_page, last_page, 1, [&](uint64_t lo, uint64_t hi) {
      access::release_run(st, a, rel, lo, hi);
    });
  }
  as.page_pins.fetch_sub(released, std::memory_order_acq_rel);
  return {};
}

uint64_t Access::page_pinned_count() const {
  return state_->page_pins.load(std::memory_order_acquire);
}

}  // namespace iomm
