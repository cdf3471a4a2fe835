// Per-page reference-counted pins of an access (see include/iomm/access.hpp).
#include <algorithm>
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

  void add(const Area* a, uint64_t iova) noexcept {
    if (a != nullptr && a == area_ && iova == start_ + (pages_ << kPageShift)) {
      ++pages_;
      return;
    }
    flush();
    if (a == nullptr) return;
    area_ = a;
    start_ = iova;
    pages_ = 1;
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
// 1. Under page_mu and tree_mu (shared): check every page, raise the count of
//    pages already pinned, and for pages at count 0 raise their area's
//    access_pins and pins_in_flight. Hold the count blocks of the range busy
//    so a concurrent unpin cannot free them.
// 2. Without locks: pin the pages that were at count 0, one pin store call
//    per run of consecutive such pages of one area.
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
  std::vector<const Area*> areas;  // per page
  std::vector<uint8_t> fresh;      // per page: at count 0 when checked, pinned by this call
  uint64_t fresh_count = 0;
  uint64_t checked = 0;  // pages counted in step 1
  bool held = false;     // the blocks of the range are held busy
  // The fresh pages' area counts are raised once per run of one area (under
  // tree_mu, before it is dropped), not once per page.
  const Area* run_area = nullptr;
  uint64_t run_fresh = 0;
  auto count_run = [&] {
    if (run_fresh == 0) return;
    run_area->access_pins.fetch_add(run_fresh, std::memory_order_acq_rel);
    run_area->pins_in_flight.fetch_add(run_fresh, std::memory_order_acq_rel);
    run_fresh = 0;
  };
  // Undo step 1 for pages [0, checked), page_mu held. No page reaches count
  // 0 here, because nothing else changed the counts since step 1.
  auto undo_checked = [&] {
    count_run();
    for (uint64_t i = 0; i < checked; ++i) {
      if (fresh[i] != 0) {
        areas[i]->access_pins.fetch_sub(1, std::memory_order_release);
        areas[i]->pins_in_flight.fetch_sub(1, std::memory_order_release);
      } else {
        counts.sub(first_page + i);
      }
    }
    if (held) counts.release_blocks(first_page, last_page);
    counts.trim(first_page, last_page);
    if (fresh_count != 0) st.note_flight_exit();
  };

  std::unique_lock pl(as.page_mu);
  try {
    if (IOMM_INJECT("access.alloc_page_pins")) throw std::bad_alloc();
    areas.resize(npages);
    fresh.resize(npages);
    counts.prepare(first_page, last_page);
    counts.hold_blocks(first_page, last_page);
    held = true;
    std::shared_lock tree(st.tree_mu);
    const Area* a = nullptr;
    for (; checked < npages; ++checked) {
      const uint64_t at = page_iova(checked);
      if (a == nullptr || at > a->range.last) {
        a = access::area_at(st, at);
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
      }
      areas[checked] = a;
      if (counts.get(first_page + checked) == 0) {
        fresh[checked] = 1;
        ++fresh_count;
        if (a != run_area) {
          count_run();
          run_area = a;
        }
        ++run_fresh;
      } else {
        counts.add(first_page + checked);
      }
    }
    count_run();
  } catch (const std::bad_alloc&) {
    undo_checked();
    return Error(ENOMEM, "out of memory");
  }
  pl.unlock();

  // Step 2. The areas are held by the access_pins raised above.
  uint64_t done = npages;  // on failure: fresh pages before it are pinned
  Status result;
  for (uint64_t i = 0; i < npages && result;) {
    if (fresh[i] == 0) {
      ++i;
      continue;
    }
    uint64_t end = i + 1;
    while (end < npages && fresh[end] != 0 && areas[end] == areas[i]) ++end;
    const Area& a = *areas[i];
    result = a.source.object()->pin_pages(a.owner.get(), a.backing_offset(page_iova(i)),
                                          (end - i) << kPageShift, (prot & kProtWrite) != 0);
    if (!result) done = i;
    i = end;
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
  {
    access::RunReleaser rel;
    const Area* flight_area = nullptr;  // fresh pages leave flight per run of one area
    uint64_t flight_pages = 0;
    auto leave_flight = [&] {
      if (flight_pages != 0)
        flight_area->pins_in_flight.fetch_sub(flight_pages, std::memory_order_acq_rel);
      flight_pages = 0;
    };
    for (uint64_t i = 0; i < npages; ++i) {
      const Area& a = *areas[i];
      const uint64_t page = first_page + i;
      if (fresh[i] == 0) {
        if (result) continue;
        // Another call may have dropped its own count meanwhile.
        if (counts.sub(page) == 0) {
          rel.add(&a, page_iova(i));
          as.page_pins.fetch_sub(1, std::memory_order_acq_rel);
        }
        continue;
      }
      if (!result) {
        a.pins_in_flight.fetch_sub(1, std::memory_order_acq_rel);
        if (i < done) {
          rel.add(&a, page_iova(i));
        } else {
          a.access_pins.fetch_sub(1, std::memory_order_release);
        }
        continue;
      }
      // A page leaves flight before its area's access_pins can drop.
      if (&a != flight_area) {
        leave_flight();
        flight_area = &a;
      }
      ++flight_pages;
      if (counts.add(page) == 0) {
        ++counted;
      } else {
        leave_flight();
        rel.add(&a, page_iova(i));  // pinned by another call meanwhile
      }
    }
    leave_flight();
  }
  if (result) {
    for (uint64_t i = 0; i < npages; ++i) {
      host[i] = areas[i]->source.object()->host(areas[i]->backing_offset(page_iova(i)));
    }
    as.page_pins.fetch_add(counted, std::memory_order_acq_rel);
  }
  counts.release_blocks(first_page, last_page);
  counts.trim(first_page, last_page);
  pl.unlock();
  if (fresh_count != 0) st.note_flight_exit();
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
  IoasState& st = ioas::state_of(*as.ioas);
  std::shared_lock tree(st.tree_mu);
  const Area* a = nullptr;
  uint64_t released = 0;
  {
    access::RunReleaser rel;
    for (uint64_t i = 0; i < npages; ++i) {
      const uint64_t page_iova = iova + (i << kPageShift);
      if (as.page_counts.sub(first_page + i) != 0) continue;
      if (a == nullptr || page_iova < a->range.start || page_iova > a->range.last) {
        a = access::area_at(st, page_iova);
      }
      rel.add(a, page_iova);
      ++released;
    }
  }
  as.page_pins.fetch_sub(released, std::memory_order_acq_rel);
  return {};
}

uint64_t Access::page_pinned_count() const {
  return state_->page_pins.load(std::memory_order_acquire);
}

}  // namespace iomm
