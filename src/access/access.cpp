// Accesses: pin, unpin, rw, and the unmap callback protocol
// (see include/iomm/access.hpp for the contract).
#include "iomm/access.hpp"

#include <algorithm>
#include <new>
#include <string>

#include "access/access_state.hpp"
#include "fault/inject.hpp"
#include "ioas/ioas_state.hpp"

namespace iomm {

using access::AccessState;
using access::PinSlice;
using ioas::Area;
using ioas::AreaState;
using ioas::IoasState;

namespace access {

Flight::Flight(AccessState& access, const IovaRange& range) : access_(access), range_(range) {
  std::lock_guard lk(access_.mu);
  next_ = access_.flights;
  if (next_ != nullptr) next_->prev_ = this;
  access_.flights = this;
  linked_ = true;
}

Flight::~Flight() {
  if (!linked_) return;
  std::lock_guard lk(access_.mu);
  land_locked();
}

void Flight::land_locked() noexcept {
  if (prev_ != nullptr) {
    prev_->next_ = next_;
  } else {
    access_.flights = next_;
  }
  if (next_ != nullptr) next_->prev_ = prev_;
  linked_ = false;
}

bool AccessState::holds_nothing_in(const IovaRange& r) const noexcept {
  std::unique_lock lk(mu, std::try_to_lock);
  if (!lk.owns_lock() || flights != nullptr) return false;
  const bool recorded = std::any_of(pins.begin(), pins.end(), [&](const auto& entry) {
    return IovaRange{entry.first, entry.first + entry.second.length - 1}.overlaps(r);
  });
  // Page pins commit their counts before their flight lands (may_pin).
  return !recorded && page_pins.load(std::memory_order_acquire) == 0;
}

bool AccessState::may_pin(const IovaRange& r) const {
  {
    // Flights and records first, under one hold of mu: a pin unlinks its
    // flight under the hold that records it. A page pin commits its counts
    // before its flight lands, so once the flight is gone they are visible.
    std::lock_guard lk(mu);
    for (const Flight* f = flights; f != nullptr; f = f->next()) {
      if (f->range().overlaps(r)) return true;
    }
    const bool recorded = std::any_of(pins.begin(), pins.end(), [&](const auto& entry) {
      return IovaRange{entry.first, entry.first + entry.second.length - 1}.overlaps(r);
    });
    if (recorded) return true;
  }
  return page_pins.load(std::memory_order_acquire) != 0 && page_pins_overlap(r);
}

}  // namespace access

namespace {

// The pin is recorded or has failed: it no longer holds up an unmap that
// waits for pins in flight.
void leave_flight(IoasState& st, const std::vector<PinSlice>& slices) noexcept {
  for (const PinSlice& s : slices) s.area->pins_in_flight.fetch_sub(1, std::memory_order_acq_rel);
  st.note_flight_exit();
}

void release_slices(const std::vector<PinSlice>& slices, size_t pinned) noexcept {
  for (size_t i = 0; i < slices.size(); ++i) {
    const Area& a = *slices[i].area;
    if (i < pinned) {
      a.source.object()->unpin(a.owner.get(), a.backing_offset(slices[i].iova), slices[i].length);
    }
    a.access_pins.fetch_sub(1, std::memory_order_release);
  }
}

// Walk the areas covering [r.start, r.last] under the tree lock and check
// them for an access of kind `need` (kProtRead or kProtWrite).
Status check_covered(const IoasState& st, const IovaRange& r, uint32_t need,
                     std::vector<PinSlice>* out) {
  uint64_t pos = r.start;
  for (auto it = st.first_overlap(r); it != st.areas.end() && it->first <= r.last; ++it) {
    const auto& a = it->second;
    if (a->range.start > pos) break;
    if (a->state == AreaState::removing) return Error(EINVAL, "range is being unmapped");
    if (a->host_invalid) return Error(EBUSY, "the host address of the range is being updated");
    if (a->state != AreaState::live) break;
    if (out != nullptr && a->demand != nullptr) {
      return Error(EINVAL, "an on-demand mapping cannot be pinned");
    }
    if ((a->prot & need) != need) return Error(EPERM, "mapping does not allow this access");
    if (a->source.object()->synthetic()) {
      if (out == nullptr) return Error(ENXIO, "no memory behind a simulated mapping");
    }
    const uint64_t last = std::min(a->range.last, r.last);
    if (out != nullptr) out->push_back({a, pos, last - pos + 1});
    if (last == r.last) return {};
    pos = last + 1;
  }
  return Error(ENOENT, "part of the range is not mapped");
}

Status check_range(uint64_t iova, uint64_t length) {
  if (length == 0) return Error(EINVAL, "zero length");
  if (!make_range(iova, length)) return Error(EOVERFLOW, "iova + length wraps");
  return {};
}

}  // namespace

Result<std::shared_ptr<Access>> Access::create(const std::shared_ptr<Ioas>& ioas,
                                               UnmapCallback on_unmap) {
  if (!ioas) return Error(EINVAL, "no IOAS");
  if (!on_unmap) return Error(EINVAL, "an unmap callback is mandatory");
  auto state =
      std::unique_ptr<AccessState>(new (std::nothrow) AccessState(ioas, std::move(on_unmap)));
  if (!state || IOMM_INJECT("access.alloc")) return Error(ENOMEM, "out of memory");
  // Unmap notification: the IOAS's invalidation of a range reaches this
  // notifier, and the driver is called if the access holds or is pinning
  // anything there. The driver may sleep (its own lock, unpin), so the
  // non-blocking pass is refused; live update leaves pinned pages in place
  // (replace_host refuses mappings with access pins), so only unmaps matter.
  auto watch = IntervalNotifier::watch_iova(
      ioas, {0, UINT64_MAX},
      [a = state.get()](IntervalNotifier&, const Invalidation& inv, uint64_t) {
        if (inv.cause != InvalidationCause::unmap) return true;
        // An access that holds nothing there is done without sleeping, so
        // it never waits for the blocking pass (and whoever destroys it
        // meanwhile, perhaps under a lock another driver's callback takes,
        // does not wait for that callback).
        if (!inv.blocking) return a->holds_nothing_in(inv.range);
        // A driver that does not unpin this round: the unmap must retry.
        if (a->may_pin(inv.range) && !IOMM_INJECT("access.callback")) a->on_unmap(inv.range);
        return true;
      });
  if (!watch.ok()) return watch.error();
  state->watch = std::move(watch).value();
  IoasState& st = ioas::state_of(*ioas);
  {
    std::unique_lock tree(st.tree_mu);
    if (!st.areas_aligned(std::max(st.iova_alignment(), kPageSize))) {
      return Error(EADDRINUSE, "a mapping is not page aligned, which an access needs");
    }
    ++st.access_count;
  }
  std::shared_ptr<Access> access;
  bool listed = false;
  try {
    access.reset(new (std::nothrow) Access(nullptr));  // frees it if the count cannot be allocated
    if (access) {
      std::lock_guard lk(st.accesses_mu);
      st.accesses.push_back(state.get());
      listed = true;
    }
  } catch (const std::bad_alloc&) {
  }
  if (!listed) {
    std::unique_lock tree(st.tree_mu);
    --st.access_count;
    return Error(ENOMEM, "out of memory");
  }
  access->state_ = std::move(state);
  return access;
}

Access::Access(std::unique_ptr<AccessState> state) : state_(std::move(state)) {}

Access::~Access() {
  if (!state_) return;
  IoasState& st = ioas::state_of(*state_->ioas);
  {
    std::lock_guard lk(st.accesses_mu);
    std::erase(st.accesses, state_.get());
  }
  state_->watch.reset();  // waits for a callback running on another thread
  for (const auto& [iova, record] : state_->pins)
    release_slices(record.slices, record.slices.size());
  access::release_all_page_pins(*state_);
  std::unique_lock tree(st.tree_mu);
  --st.access_count;
}

Result<std::vector<PinnedSegment>> Access::pin(uint64_t iova, uint64_t length, uint32_t prot) {
  if (Status s = check_range(iova, length); !s) return s.error();
  if (!is_aligned(iova, kPageSize) || !is_aligned(length, kPageSize)) {
    return Error(EINVAL, "pins must be page aligned");
  }
  if ((prot & ~(kProtRead | kProtWrite)) != 0 || prot == 0) return Error(EINVAL, "bad prot");
  const IovaRange range = *make_range(iova, length);
  IoasState& st = ioas::state_of(*state_->ioas);

  // In flight before the checks, so an unmap of an overlapping range that
  // starts after them calls us.
  access::Flight flight(*state_, range);

  access::PinRecord record{length, {}};
  std::vector<PinnedSegment> segments;
  try {
    std::shared_lock tree(st.tree_mu);
    if (IOMM_INJECT("access.alloc_slices")) throw std::bad_alloc();
    if (Status s = check_covered(st, range, prot, &record.slices); !s) return s.error();
    for (const PinSlice& s : record.slices) {
      s.area->access_pins.fetch_add(1, std::memory_order_acq_rel);
      s.area->pins_in_flight.fetch_add(1, std::memory_order_acq_rel);
    }
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory");
  }

  size_t pinned = 0;
  Status result;
  for (; pinned < record.slices.size(); ++pinned) {
    const PinSlice& s = record.slices[pinned];
    const Area& a = *s.area;
    result = a.source.object()->pin(a.owner.get(), a.backing_offset(s.iova), s.length,
                                    (prot & kProtWrite) != 0);
    if (!result) break;
  }
  if (result) {
    try {
      if (IOMM_INJECT("access.alloc_pin_record")) throw std::bad_alloc();
      segments.reserve(record.slices.size());
      for (const PinSlice& s : record.slices) {
        segments.push_back(
            {s.iova, s.length, s.area->source.object()->host(s.area->backing_offset(s.iova))});
      }
      std::lock_guard lk(state_->mu);
      auto recorded = state_->pins.emplace(iova, std::move(record));
      state_->pinned_bytes += length;
      flight.land_locked();
      // Under mu: an unpin from the callback cannot free the record yet.
      leave_flight(st, recorded->second.slices);
      return segments;
    } catch (const std::bad_alloc&) {
      result = Error(ENOMEM, "out of memory");
    }
  }
  leave_flight(st, record.slices);
  release_slices(record.slices, pinned);
  return result.error();
}

Status Access::unpin(uint64_t iova, uint64_t length) {
  if (Status s = check_range(iova, length); !s) return s;
  access::PinRecord record;
  {
    std::lock_guard lk(state_->mu);
    auto [first, last] = state_->pins.equal_range(iova);
    auto it = std::find_if(first, last, [&](const auto& e) { return e.second.length == length; });
    if (it == last) return Error(EINVAL, "no pin matches this iova and length exactly");
    record = std::move(it->second);
    state_->pins.erase(it);
    state_->pinned_bytes -= length;
  }
  release_slices(record.slices, record.slices.size());
  return {};
}

namespace {

Status copy_by_iova(AccessState& state, uint64_t iova, void* buf, size_t length, bool write) {
  if (length == 0) return {};
  if (!make_range(iova, length)) return Error(EOVERFLOW, "iova + length wraps");
  const IovaRange range = *make_range(iova, length);
  IoasState& st = ioas::state_of(*state.ioas);
  std::shared_lock tree(st.tree_mu);
  // Check the whole range before moving a byte.
  if (Status s = check_covered(st, range, write ? kProtWrite : kProtRead, nullptr); !s) return s;
  // Dirty before the first byte moves: a page reported dirty but not written
  // is harmless, a written page missing from the log is lost by a migration.
  if (write && !st.dirty.mark(iova, length)) return Error(ENOMEM, "cannot allocate the dirty log");
  auto* cursor = static_cast<std::byte*>(buf);
  uint64_t pos = iova;
  for (auto it = st.first_overlap(range); it != st.areas.end() && it->first <= range.last; ++it) {
    const Area& a = *it->second;
    const uint64_t last = std::min(a.range.last, range.last);
    const uint64_t n = last - pos + 1;
    const mem::MemObject& backing = *a.source.object();
    const uint64_t offset = a.backing_offset(pos);
    const bool ok =
        write ? backing.copy_in(offset, cursor, n) : backing.copy_out(offset, cursor, n);
    if (!ok)
      return Error(
          EFAULT,
          "the memory behind the mapping is not there (unmapped, read-only or a shrunk file)");
    cursor += n;
    if (last == range.last) break;
    pos = last + 1;
  }
  return {};
}

}  // namespace

Status Access::read(uint64_t iova, void* buf, size_t length) {
  return copy_by_iova(*state_, iova, buf, length, false);
}

Status Access::write(uint64_t iova, const void* buf, size_t length) {
  return copy_by_iova(*state_, iova, const_cast<void*>(buf), length, true);
}

uint64_t Access::pinned_bytes() const {
  std::lock_guard lk(state_->mu);
  return state_->pinned_bytes;
}

uint64_t Access::pin_count() const {
  std::lock_guard lk(state_->mu);
  return state_->pins.size();
}

}  // namespace iomm
