// Map, unmap and copy (see include/iomm/ioas.hpp for the contract).
#include "iomm/ioas.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <new>
#include <string>
#include <thread>

#include "access/access_state.hpp"
#include "core/check.hpp"
#include "domain/page_table.hpp"
#include "fault/inject.hpp"
#include "ioas/external.hpp"
#include "ioas/ioas_state.hpp"

namespace iomm {

using ioas::Area;
using ioas::AreaState;
using ioas::IoasState;

namespace {

struct Slice {
  MemorySource source;
  std::shared_ptr<acct::Owner> owner;  // null for on-demand slices
  bool on_demand = false;
};

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string describe(const IovaRange& r) { return "[" + hex(r.start) + ", " + hex(r.last) + "]"; }

Status check_prot(uint32_t prot) {
  if ((prot & ~(kProtRead | kProtWrite)) != 0) return Error(EINVAL, "unknown prot bits");
  if ((prot & (kProtRead | kProtWrite)) == 0) return Error(EINVAL, "prot needs read or write");
  return {};
}

uint64_t backing_address(const MemorySource& s) { return s.object()->dma_address(s.offset()); }

// Remove the areas from the tree (they never became visible as live).
void erase_areas(IoasState& st, const std::vector<std::shared_ptr<Area>>& created) {
  std::unique_lock tree(st.tree_mu);
  for (const auto& a : created) st.areas.erase(a->range.start);
}

// Reserve IOVA for the slices as placeholder areas, then pin and fill every
// domain outside the tree lock, then publish. All-or-nothing.
Result<uint64_t> insert_and_fill(IoasState& st, const std::vector<Slice>& slices, uint32_t prot,
                                 std::optional<uint64_t> fixed_iova) {
  uint64_t total = 0;
  for (const Slice& s : slices) {
    if (__builtin_add_overflow(total, s.source.length(), &total)) {
      return Error(EOVERFLOW, "total length overflows");
    }
  }
  std::vector<std::shared_ptr<Area>> created;
  uint64_t start = 0;
  try {
    created.reserve(slices.size());
    std::unique_lock tree(st.tree_mu);
    const uint64_t align = st.iova_alignment();
    for (const Slice& s : slices) {
      if (!is_aligned(s.source.length(), align) || !is_aligned(backing_address(s.source), align)) {
        return Error(EINVAL,
                     "length and backing address must be aligned to " + std::to_string(align));
      }
    }
    if (fixed_iova) {
      if (!is_aligned(*fixed_iova, align)) {
        return Error(EINVAL,
                     "IOVA " + hex(*fixed_iova) + " is not aligned to " + std::to_string(align));
      }
      const auto range = make_range(*fixed_iova, total);
      if (!range) return Error(EOVERFLOW, "IOVA + length wraps");
      if (st.overlaps_reserved(*range)) {
        return Error(EINVAL, "IOVA range " + describe(*range) + " overlaps a reserved range");
      }
      if (st.overlaps_area(*range)) {
        return Error(EEXIST, "IOVA range " + describe(*range) + " overlaps a mapping");
      }
      start = *fixed_iova;
    } else {
      auto allocated = st.allocate_iova(total, backing_address(slices.front().source));
      if (!allocated.ok()) return allocated.error();
      start = *allocated;
    }
    if (st.areas.size() + slices.size() > st.options.max_mappings) {
      return Error(ENOSPC,
                   "mapping limit of " + std::to_string(st.options.max_mappings) + " reached");
    }
    uint64_t iova = start;
    for (const Slice& s : slices) {
      if (IOMM_INJECT("ioas.alloc_area")) throw std::bad_alloc();
      auto area = std::make_shared<Area>(IovaRange{iova, iova + s.source.length() - 1}, s.source,
                                         prot, s.owner, s.on_demand);
      st.areas.emplace(iova, area);
      created.push_back(std::move(area));
      iova += s.source.length();
    }
  } catch (const std::bad_alloc&) {
    erase_areas(st, created);
    return Error(ENOMEM, "out of memory for the mapping");
  }

  // On-demand areas follow their source through a notifier from now on.
  for (const auto& a : created) {
    if (a->demand == nullptr) continue;
    if (Status s = ioas::watch_on_demand(st, *a); !s) {
      erase_areas(st, created);
      return s.error();
    }
  }

  std::shared_lock domains(st.domains_mu);
  // External domains pin for themselves; the pin below is for ours.
  if (Status s = ioas::map_external(st, created); !s) {
    domains.unlock();
    erase_areas(st, created);
    return s.error();
  }
  if (!st.domains.empty()) {
    size_t pinned = 0;
    Status result;
    for (; pinned < created.size() && result; ++pinned) result = created[pinned]->pin_all();
    if (!result) --pinned;
    size_t domains_done = 0;
    size_t areas_in_last = 0;
    for (; result && domains_done < st.domains.size(); ++domains_done) {
      domain::PageTable& pt = domain::page_table_of(*st.domains[domains_done]);
      for (areas_in_last = 0; areas_in_last < created.size() && result; ++areas_in_last) {
        const Area& a = *created[areas_in_last];
        if (a.demand != nullptr) continue;  // filled below, if its memory is there
        result = pt.map(a.range.start, backing_address(a.source), a.length(), prot,
                        a.source.object()->host_access());
      }
      if (!result) {
        --areas_in_last;
        break;
      }
    }
    for (size_t i = 0; result && i < created.size(); ++i) {
      if (created[i]->demand != nullptr &&
          ioas::fill_on_demand(st, *created[i], nullptr, true) == ioas::Fill::failed) {
        result = Error(ENOMEM, "out of memory for the page table");
      }
    }
    if (!result) {
      for (size_t d = 0; d <= domains_done && d < st.domains.size(); ++d) {
        // The area whose map failed too: its map undid its leaves but kept
        // the tables it allocated, which this unmap retires.
        const size_t n = d < domains_done ? created.size() : areas_in_last + 1;
        for (size_t i = 0; i < n; ++i) {
          domain::page_table_of(*st.domains[d])
              .unmap(created[i]->range.start, created[i]->length());
        }
      }
      for (const auto& a : created) ioas::unmap_external(st, *a);
      ioas::wait_for_readers(st.domains);  // a device may have seen the translations
      for (size_t i = 0; i < pinned; ++i) created[i]->unpin_all();
      domains.unlock();
      erase_areas(st, created);
      return result.error();
    }
  }
  {
    std::unique_lock tree(st.tree_mu);
    for (const auto& a : created) {
      a->domain_pinned.store(!st.domains.empty() && a->demand == nullptr,
                             std::memory_order_relaxed);
      a->state = AreaState::live;
    }
    st.mapped_bytes += total;
  }
  return start;
}

// The areas one unmap removes, chained through Area::next_victim.
struct Victims {
  Area* head = nullptr;
  Area* tail = nullptr;

  void push(Area* a) noexcept {
    a->next_victim = nullptr;
    (tail != nullptr ? tail->next_victim : head) = a;
    tail = a;
  }
  template <typename F>
  void each(F f) const {
    for (Area* a = head; a != nullptr; a = a->next_victim) f(*a);
  }
  [[nodiscard]] uint64_t access_pins() const noexcept {
    uint64_t n = 0;
    for (const Area* a = head; a != nullptr; a = a->next_victim) {
      n += a->access_pins.load(std::memory_order_acquire);
    }
    return n;
  }
  [[nodiscard]] bool any_in_flight() const noexcept {
    for (const Area* a = head; a != nullptr; a = a->next_victim) {
      if (a->pins_in_flight.load(std::memory_order_acquire) != 0) return true;
    }
    return false;
  }
};

// Deliver the unmap of the victims to the IOAS's notifiers, one delivery per
// contiguous run.
void deliver_unmap(notify::Window& window, const Victims& victims) noexcept {
  for (const Area* run = victims.head; run != nullptr;) {
    IovaRange span = run->range;
    const Area* next = run->next_victim;
    for (; next != nullptr && span.last != UINT64_MAX && next->range.start == span.last + 1;
         next = next->next_victim) {
      span.last = next->range.last;
    }
    window.deliver(span, InvalidationCause::unmap);
    run = next;
  }
}

// Invalidate the victims until no access holds pins on them. Every access
// is a notifier over the whole IOVA space whose callback asks its driver to
// unpin (src/access/access.cpp), so one delivery tells consumers and
// accesses alike; it repeats only while access pins remain. Only rounds
// without progress count toward kUnmapNotifyRetries: a round that released
// pins is progress, and while a pin of the victims is still in flight
// (locking pages, e.g. a 1 GiB mlock) the loop sleeps until some pin leaves
// flight, bounded in all by options.unmap_pin_wait_ms. A driver that unpins
// in its callback finishes in one round with no wait; one that never unpins
// gets kUnmapNotifyRetries calls and EDEADLOCK, after about 0.1 s of
// back-off. Every round either lowers the victims' pin count (which no new
// pin can raise: the areas are removing), consumes a flight exit (bounded by
// the wait deadline) or counts as idle, so the loop is bounded.
bool invalidate_victims(IoasState& st, const Victims& victims, notify::Window& window) {
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(st.options.unmap_pin_wait_ms);
  uint64_t pins = victims.access_pins();
  int idle_rounds = 0;
  for (;;) {
    // Read before the flight counts: a pin leaving flight after this read
    // is seen by the wait below.
    const uint64_t exits = st.flight_exit_count();
    deliver_unmap(window, victims);
    const uint64_t left = victims.access_pins();
    if (left == 0) return true;
    if (victims.any_in_flight()) {
      std::unique_lock lk(st.flight_mu);
      if (!st.flight_changed.wait_until(lk, deadline, [&] { return st.flight_exits != exits; })) {
        return false;
      }
      idle_rounds = 0;
    } else if (left < pins) {
      idle_rounds = 0;
    } else if (++idle_rounds >= kUnmapNotifyRetries) {
      return false;
    } else if (idle_rounds < 8) {
      std::this_thread::yield();
    } else {
      const int shift = std::min(idle_rounds - 8, 10);  // 1 µs doubling up to ~1 ms
      std::this_thread::sleep_for(std::chrono::microseconds(1 << shift));
    }
    pins = left;
  }
}

// Where an unmap reports the dirty bits of what it removes: bit i of bits
// is 4 KiB page base_page + i.
struct DirtyOut {
  uint64_t base_page;
  std::span<uint64_t> bits;
};

// Unmap every area inside r. Empty is success with 0 bytes. Allocates
// nothing except for an error message. With dirty, the removed range's
// dirty bits are ORed into it once no writer can reach the range any more.
Result<uint64_t> remove_range(IoasState& st, const IovaRange& r, const DirtyOut* dirty = nullptr) {
  Victims victims;
  uint64_t bytes = 0;
  {
    std::unique_lock tree(st.tree_mu);
    for (auto it = st.first_overlap(r); it != st.areas.end() && it->first <= r.last; ++it) {
      const Area& a = *it->second;
      if (!r.contains(a.range)) {
        return Error(ENOENT, "range " + describe(r) + " cuts mapping " + describe(a.range));
      }
      if (a.state != AreaState::live) {
        return Error(EBUSY, "mapping " + describe(a.range) + " is being created or removed");
      }
    }
    for (auto it = st.first_overlap(r); it != st.areas.end() && it->first <= r.last; ++it) {
      Area& a = *it->second;
      a.state = AreaState::removing;
      bytes += a.length();
      victims.push(&a);
    }
  }
  if (victims.head == nullptr) return uint64_t{0};

  // Pages accesses hold pinned count as dirty (read_and_clear_dirty); their
  // unmap callbacks below unpin them, so take them now. Reported only if the unmap succeeds.
  if (dirty != nullptr && dirty->base_page <= victims.tail->range.last >> kPageShift) {
    const uint64_t last_page = victims.tail->range.last >> kPageShift;
    std::lock_guard lk(st.accesses_mu);
    for (const access::AccessState* a : st.accesses) {
      access::collect_pinned(*a, dirty->base_page, last_page - dirty->base_page + 1, dirty->bits);
    }
  }

  // Consumers and accesses hear of it before any translation goes. The
  // invalidation ends after the areas are erased (or put back, on failure),
  // so a read_begin meanwhile waits and then finds the range unmapped (or
  // mapped again: a failed unmap is a spurious invalidation).
  notify::Window window(st.notifiers);
  if (!invalidate_victims(st, victims, window)) {
    std::unique_lock tree(st.tree_mu);
    victims.each([](Area& a) { a.state = AreaState::live; });
    return Error(EDEADLOCK, "an access kept pins in " + describe(r) + " after " +
                                std::to_string(kUnmapNotifyRetries) +
                                " unmap notifications without progress, or a pin stayed in "
                                "flight past the unmap's wait");
  }

  // On-demand areas stop following their source (waiting for a callback
  // that is dropping their translations right now).
  victims.each([](Area& a) {
    if (a.demand != nullptr) a.demand->watch.reset();
  });

  // Teardown order: translations out of every domain, wait for lock-free
  // readers, release the pages (and with them the charge).
  {
    std::shared_lock domains(st.domains_mu);
    for (const auto& d : st.domains) {
      victims.each([&](Area& a) { domain::page_table_of(*d).unmap(a.range.start, a.length()); });
    }
    victims.each([&](Area& a) { ioas::unmap_external(st, a); });
    if (!st.domains.empty()) ioas::wait_for_readers(st.domains);
    victims.each([](Area& a) {
      if (a.domain_pinned.exchange(false)) a.unpin_all();
    });
  }
  std::unique_lock tree(st.tree_mu);
  const uint64_t first_page = victims.head->range.start >> kPageShift;
  const uint64_t last_page = victims.tail->range.last >> kPageShift;
  // Device DMA ended with the grace period above and access rw stopped when
  // the areas became `removing`: the log is final for the range. Read it
  // before clearing it, or a write between the two would be lost.
  if (dirty != nullptr) {
    st.dirty.collect(first_page, last_page - first_page + 1, dirty->bits, false, dirty->base_page);
  }
  st.dirty.clear(first_page, last_page);
  // Read each link before erasing: erasing may free the area.
  for (Area* a = victims.head; a != nullptr;) {
    Area* next = a->next_victim;
    if (a->host_invalid) --st.host_invalid_areas;
    st.areas.erase(a->range.start);
    a = next;
  }
  st.mapped_bytes -= bytes;
  // Dirty-log tables no mapping reaches any more. Safe now: collectors and
  // access writers hold tree_mu, and DMA writers cannot mark pages whose
  // translations are gone (readers were waited for above); every area that
  // still has translations is in the tree.
  st.dirty.release_unused(
      first_page, last_page,
      [](const void* state, uint64_t first, uint64_t last) {
        return static_cast<const IoasState*>(state)->overlaps_area(
            {first << kPageShift, (last << kPageShift) | (kPageSize - 1)});
      },
      &st);
  return bytes;
}

Status check_unmap_args(uint64_t iova, uint64_t length) {
  if (iova == UINT64_MAX || length == UINT64_MAX)
    return Error(EOVERFLOW, "iova or length too large");
  if (length == 0) return Error(EINVAL, "zero length");
  if (!make_range(iova, length)) return Error(EOVERFLOW, "iova + length wraps");
  return {};
}

}  // namespace

Result<std::shared_ptr<Ioas>> Ioas::create(const IoasOptions& options) {
  if (options.max_mappings == 0) return Error(EINVAL, "max_mappings must be at least 1");
  auto state = std::unique_ptr<IoasState>(new (std::nothrow) IoasState(options));
  if (!state) return Error(ENOMEM, "out of memory");
  std::unique_ptr<Ioas> ioas(new (std::nothrow) Ioas(std::move(state)));
  if (!ioas) return Error(ENOMEM, "out of memory");
  try {
    return std::shared_ptr<Ioas>(std::move(ioas));
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory");
  }
}

Ioas::Ioas(std::unique_ptr<IoasState> state) : state_(std::move(state)) {}

Ioas::~Ioas() {
  // Accesses hold a reference, so none is left: unmap_all cannot deadlock,
  // and nothing else can race with us.
  auto unmapped = remove_range(*state_, {0, UINT64_MAX});
  IOMM_CHECK(unmapped.ok(), "unmapping everything at destruction failed");
  for (;;) {
    std::shared_ptr<SoftDomain> d;
    {
      std::shared_lock lk(state_->domains_mu);
      if (state_->domains.empty()) break;
      d = state_->domains.back();
    }
    Status s = detach(d);
    IOMM_CHECK(s.ok(), "detach at destruction failed");
  }
  // Nothing is mapped any more: the external domains just go.
  std::unique_lock lk(state_->domains_mu);
  state_->external.clear();
}

const IoasOptions& Ioas::options() const noexcept { return state_->options; }

Result<uint64_t> Ioas::map(const MemorySource& source, uint32_t prot,
                           std::optional<uint64_t> iova) {
  return map_as(source, prot, iova, state_->options.owner);
}

Result<uint64_t> Ioas::map_as(const MemorySource& source, uint32_t prot,
                              std::optional<uint64_t> iova, const OwnerSpec& owner_spec) {
  if ((iova && *iova == UINT64_MAX) || source.length() == UINT64_MAX) {
    return Error(EOVERFLOW, "iova or length too large");
  }
  if (Status s = check_prot(prot); !s) return s.error();
  if ((prot & kProtWrite) != 0 && !source.writable()) {
    return Error(EPERM, "write access requested on a read-only source");
  }
  auto owner = acct::owner_for_mapping(state_->options.account_mode, owner_spec);
  if (!owner.ok()) return owner.error();
  std::vector<Slice> slices;
  try {
    slices.push_back({source, std::move(owner).value()});
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory");
  }
  return insert_and_fill(*state_, slices, prot, iova);
}

Result<uint64_t> Ioas::map_on_demand(const MemorySource& source, uint32_t prot,
                                     std::optional<uint64_t> iova) {
  if ((iova && *iova == UINT64_MAX) || source.length() == UINT64_MAX) {
    return Error(EOVERFLOW, "iova or length too large");
  }
  if (Status s = check_prot(prot); !s) return s.error();
  if ((prot & kProtWrite) != 0 && !source.writable()) {
    return Error(EPERM, "write access requested on a read-only source");
  }
  std::vector<Slice> slices;
  try {
    slices.push_back({source, nullptr, true});
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory");
  }
  return insert_and_fill(*state_, slices, prot, iova);
}

Result<uint64_t> Ioas::unmap(uint64_t iova, uint64_t length) {
  auto bytes = unmap_range_allow_empty(iova, length);
  if (bytes.ok() && *bytes == 0) return Error(ENOENT, "nothing is mapped in the range");
  return bytes;
}

Result<uint64_t> Ioas::unmap_range_allow_empty(uint64_t iova, uint64_t length) {
  if (Status s = check_unmap_args(iova, length); !s) return s.error();
  return remove_range(*state_, *make_range(iova, length));
}

Result<uint64_t> Ioas::unmap_collecting_dirty(uint64_t iova, uint64_t length, uint64_t bitmap_iova,
                                              std::span<uint64_t> bitmap) {
  if (Status s = check_unmap_args(iova, length); !s) return s.error();
  const DirtyOut out{bitmap_iova >> kPageShift, bitmap};
  return remove_range(*state_, *make_range(iova, length), &out);
}

Result<uint64_t> Ioas::unmap_all() { return remove_range(*state_, {0, UINT64_MAX}); }

Result<uint64_t> Ioas::copy_from(Ioas& src, uint64_t src_iova, uint64_t length, uint32_t prot,
                                 std::optional<uint64_t> iova) {
  if (length == UINT64_MAX || src_iova == UINT64_MAX || (iova && *iova == UINT64_MAX)) {
    return Error(EOVERFLOW, "iova or length too large");
  }
  if (Status s = check_prot(prot); !s) return s.error();
  if (length == 0) return Error(EINVAL, "zero length");
  const auto range = make_range(src_iova, length);
  if (!range) return Error(EOVERFLOW, "source iova + length wraps");

  std::vector<Slice> slices;
  try {
    std::shared_lock tree(src.state_->tree_mu);
    const IoasState& s = *src.state_;
    uint64_t pos = range->start;
    bool covered = false;
    for (auto it = s.first_overlap(*range); it != s.areas.end() && it->first <= range->last; ++it) {
      const Area& a = *it->second;
      if (a.range.start > pos || a.state != AreaState::live) break;
      if ((prot & kProtWrite) != 0 && !a.source.writable()) {
        return Error(EPERM, "write access requested on read-only pages");
      }
      const uint64_t last = std::min(a.range.last, range->last);
      if (IOMM_INJECT("ioas.alloc_copy")) throw std::bad_alloc();
      slices.push_back(
          {a.source.slice(pos - a.range.start, last - pos + 1), a.owner, a.demand != nullptr});
      if (last == range->last) {
        covered = true;
        break;
      }
      pos = last + 1;
    }
    if (!covered) {
      return Error(ENOENT, "source range " + describe(*range) + " is not fully mapped");
    }
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory");
  }
  return insert_and_fill(*state_, slices, prot, iova);
}

Status Ioas::set_allowed_ranges(std::span<const IovaRange> ranges) {
  std::vector<IovaRange> sorted;
  try {
    if (IOMM_INJECT("ioas.alloc_allowed")) throw std::bad_alloc();
    sorted.assign(ranges.begin(), ranges.end());
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory");
  }
  std::sort(sorted.begin(), sorted.end(),
            [](const IovaRange& a, const IovaRange& b) { return a.start < b.start; });
  for (size_t i = 0; i < sorted.size(); ++i) {
    if (sorted[i].start > sorted[i].last) return Error(EINVAL, "allowed range with start > last");
    if (i > 0 && sorted[i - 1].last >= sorted[i].start) {
      return Error(EINVAL, "allowed ranges overlap each other");
    }
  }
  std::unique_lock tree(state_->tree_mu);
  for (const IovaRange& r : sorted) {
    if (state_->overlaps_reserved(r)) {
      return Error(EADDRINUSE, "allowed range " + describe(r) + " overlaps a reserved range");
    }
  }
  state_->allowed.swap(sorted);
  return {};
}

Status Ioas::add_reserved(const IovaRange& range) {
  if (range.start > range.last) return Error(EINVAL, "reserved range with start > last");
  std::unique_lock tree(state_->tree_mu);
  if (state_->overlaps_area(range)) {
    return Error(EADDRINUSE, "reserved range " + describe(range) + " overlaps a mapping");
  }
  if (state_->overlaps_allowed(range)) {
    return Error(EADDRINUSE, "reserved range " + describe(range) + " overlaps an allowed range");
  }
  try {
    if (IOMM_INJECT("ioas.alloc_reservation")) throw std::bad_alloc();
    state_->insert_reservation({range, nullptr});
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory");
  }
  return {};
}

Status Ioas::remove_reserved(const IovaRange& range) {
  std::unique_lock tree(state_->tree_mu);
  auto& res = state_->reserved;
  auto it = std::find_if(res.begin(), res.end(), [&](const ioas::Reservation& r) {
    return r.owner == nullptr && r.range == range;
  });
  if (it == res.end()) return Error(ENOENT, "no user reservation " + describe(range));
  res.erase(it);
  return {};
}

std::vector<IovaRange> Ioas::iova_ranges() const {
  std::shared_lock tree(state_->tree_mu);
  std::vector<IovaRange> holes;
  uint64_t pos = 0;
  for (const auto& r : state_->reserved) {
    if (r.range.start > pos) holes.push_back({pos, r.range.start - 1});
    if (r.range.last == UINT64_MAX) return holes;
    pos = std::max(pos, r.range.last + 1);
  }
  holes.push_back({pos, UINT64_MAX});
  return holes;
}

std::vector<MappingInfo> Ioas::mappings() const {
  std::shared_lock tree(state_->tree_mu);
  std::vector<MappingInfo> out;
  out.reserve(state_->areas.size());
  for (const auto& [start, a] : state_->areas) {
    if (a->state != AreaState::live) continue;
    out.push_back({a->range.start, a->length(), a->prot, a->source.kind(),
                   a->domain_pinned.load(std::memory_order_relaxed),
                   a->access_pins.load(std::memory_order_relaxed)});
  }
  return out;
}

IoasCounters Ioas::counters() const {
  IoasCounters c;
  {
    std::shared_lock domains(state_->domains_mu);
    c.domains = state_->domains.size();
  }
  std::shared_lock tree(state_->tree_mu);
  c.mappings = state_->areas.size();
  c.mapped_bytes = state_->mapped_bytes;
  c.accesses = state_->access_count;
  c.iova_alignment = state_->iova_alignment();
  return c;
}

}  // namespace iomm
