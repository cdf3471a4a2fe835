// The concurrent round: 2 or 3 lanes (threads) run their operations at once
// on one IOAS, slot by slot (a barrier before each slot so the slot's calls
// overlap), each in its own window and predicted exactly by its own model;
// lanes 0 and 1 may run a conflicting pair on the shared window at one slot
// (conflict_ops.cpp). After the lanes joined, their models are merged back
// and the step loop's check_all() compares everything, as after any step.
#include <barrier>
#include <thread>

#include "ioas_sequence/concurrent.hpp"
#include "ioas_sequence/generators.hpp"
#include "ioas_sequence/operations.hpp"
#include "ioas_sequence/oracle.hpp"

namespace iomm::fuzz::ioas_sequence {

int predict_unmap(const AreaMap& areas, uint64_t iova, uint64_t len, bool allow_empty,
                  uint64_t* bytes) {
  *bytes = 0;
  if (iova == kMax || len == kMax) return EOVERFLOW;
  if (len == 0) return EINVAL;
  const auto range = range_of(iova, len);
  if (!range) return EOVERFLOW;
  int err = 0;
  for (const AreaModel* a : overlapping(areas, *range)) {
    if (!range->contains(a->range())) err = ENOENT;
    *bytes += a->len;
  }
  if (err == 0 && *bytes == 0 && !allow_empty) err = ENOENT;
  if (err != 0) *bytes = 0;
  return err;
}

int predict_dma(const DomainModel& d, const AreaMap& areas, uint64_t iova, uint64_t len,
                uint32_t need, bool* fault) {
  *fault = true;
  bool simulated = false;
  for (uint64_t pos = iova;;) {
    const AreaModel* a = d.in_aperture(pos) ? area_at(areas, pos) : nullptr;
    if (a == nullptr) return EFAULT;
    if ((a->prot & need) != need) return EPERM;
    simulated = simulated || a->src.kind() == SourceKind::simulated;
    if (a->last() >= iova + len - 1) break;
    pos = a->last() + 1;
  }
  *fault = false;
  return simulated ? ENXIO : 0;
}

bool world_pins_overlap(const IoasModel& m, const IovaRange& r) {
  for (AccessModel* acc : w->accesses_of(&m)) {
    std::lock_guard lk(acc->mu);
    for (const auto& [iova, len] : acc->pins) {
      if (IovaRange{iova, iova + len - 1}.overlaps(r)) return true;
    }
    for (const auto& [page, count] : acc->page_pins) {
      if (page_range(page).overlaps(r)) return true;
    }
  }
  return false;
}

std::set<uint64_t> pinned_pages(const IoasModel& m, AccessModel* extra, uint64_t first,
                                uint64_t n) {
  std::set<uint64_t> out;
  std::vector<AccessModel*> accs = w->accesses_of(&m);
  if (extra != nullptr) accs.push_back(extra);
  for (AccessModel* acc : accs) {
    std::lock_guard lk(acc->mu);
    for (const auto& [iova, len] : acc->pins) {
      for (uint64_t p = iova >> kPageShift; p <= (iova + len - 1) >> kPageShift; ++p) {
        if (p >= first && p - first < n) out.insert(p);
      }
    }
    for (const auto& [page, count] : acc->page_pins) {
      const uint64_t p = page >> kPageShift;
      if (p >= first && p - first < n) out.insert(p);
    }
  }
  return out;
}

namespace {

// An IOVA in the lane's window: below 0xc0 an 8 KiB step from its start;
// from 0xc0 the start of the k-th area of the window (the window's start if
// that area begins before it).
uint64_t lane_iova(const Lane& lane, uint8_t b) {
  if (b >= 0xc0 && !lane.areas.empty()) {
    auto it = lane.areas.begin();
    std::advance(it, (b - 0xc0) % lane.areas.size());
    return std::max(it->second.iova, lane.window.start);
  }
  return lane.window.start + (b % 0xc0) * 2 * kPageSize;
}

uint64_t clamp_to_window(const Lane& lane, uint64_t iova, uint64_t len) {
  return std::min(len, lane.window.last - iova + 1);
}

// A read/write length: from a table, or (0xe0 and up) to the end of the
// area at iova; at most kLaneRwMax and inside the window.
uint64_t lane_rw_len(const Lane& lane, uint8_t b, uint64_t iova) {
  constexpr uint64_t kTable[] = {1, 0xfff, 0x1000, 0x1001, 0x3000, 0x10000, 0x2000, 0x7ff};
  uint64_t len = kTable[b % std::size(kTable)];
  if (b >= 0xe0) {
    const AreaModel* a = area_at(lane.areas, iova);
    len = a != nullptr ? a->last() - iova + 1 : kPageSize;
  }
  return clamp_to_window(lane, iova, std::min(len, kLaneRwMax));
}

// The memory of a lane map: its slice of the memfd, of the simulated source
// or of user memory, or the read-only or PROT_NONE user memory (never
// written, so every lane may map it).
MemorySource lane_source(const Lane& lane, uint8_t c, uint64_t len) {
  const uint64_t page = c >> 3;
  switch ((c & 7) % 5) {
    case 0: {
      const uint64_t off = (page % (kLaneFileSize / kPageSize)) * kPageSize;
      return fx->file_rw_whole->slice(kLaneFileBase + lane.id * kLaneFileSize + off,
                                      std::min(len, kLaneFileSize - off));
    }
    case 1:
      return fx->sim[1]->slice(kLaneSimBase + lane.id * kLaneSimSize + page * kPageSize, len);
    case 2: {
      const uint64_t off = (page % (kLaneUserSize / kPageSize)) * kPageSize;
      auto s = MemorySource::from_user(fx->user + kLaneUserBase + lane.id * kLaneUserSize + off,
                                       std::min(len, kLaneUserSize - off), true);
      FUZZ_CHECK(s.ok(), "from_user failed: %s", s.ok() ? "" : s.error().describe().c_str());
      return *s;
    }
    case 3: {
      auto s = MemorySource::from_user(fx->user + fx->user_rw, std::min(len, fx->user_ro), true);
      FUZZ_CHECK(s.ok(), "from_user failed: %s", s.ok() ? "" : s.error().describe().c_str());
      return *s;
    }
    default: {
      auto s = MemorySource::from_user(fx->user + fx->user_rw + fx->user_ro,
                                       std::min(len, fx->user_none), true);
      FUZZ_CHECK(s.ok(), "from_user failed: %s", s.ok() ? "" : s.error().describe().c_str());
      return *s;
    }
  }
}

// Whether an area's memory lies in lane t's slices of the memfd or of user memory.
bool in_lane_memory(const AreaModel& a, int t) {
  if (a.src.kind() == SourceKind::file) {
    const uint64_t lo = kLaneFileBase + t * kLaneFileSize;
    return a.src.object() == fx->file_rw_whole->object() && a.src.offset() < lo + kLaneFileSize &&
           a.src.offset() + a.src.length() > lo;
  }
  if (a.src.kind() == SourceKind::user) {
    const uint64_t lo = reinterpret_cast<uint64_t>(fx->user) + kLaneUserBase + t * kLaneUserSize;
    const uint64_t host = dma_address(a.src);
    return host < lo + kLaneUserSize && host + a.src.length() > lo;
  }
  return false;
}

// Whether the bytes behind [iova, +len) are the lane's alone: its own
// memory, mapped nowhere else in the IOAS (another lane or the pair could
// write memory that is visible in this window too).
bool own_bytes(const Lane& lane, uint64_t iova, uint64_t len) {
  if (!lane.bytes_checked) return false;
  const auto areas = overlapping(lane.areas, {iova, iova + len - 1});
  return std::all_of(areas.begin(), areas.end(),
                     [&](const AreaModel* a) { return in_lane_memory(*a, lane.id); });
}

void lane_note(Lane& lane, const char* name, int code, bool tight_call) {
  if (!lane.trace.empty()) lane.trace += ", ";
  lane.trace += name;
  lane.trace += ' ';
  // After a call whose errno may depend on the other lanes, this lane's
  // results may differ from run to run: the trace shows only the names.
  lane.racy = lane.racy || tight_call;
  lane.trace += lane.racy ? "~" : (code < 0 ? "(no call)" : code == 0 ? "ok" : errno_name(code));
}

// Checks a lane call's errno: exactly `want` (or `also`, a result the
// single-threaded oracle does not tell apart either), or in a tight round
// one of `tight` (the errnos another lane's use of the budget can cause).
void lane_expect(Lane& lane, const char* name, int got, int want, const std::vector<int>& tight,
                 int also = -1) {
  const bool alt = std::find(tight.begin(), tight.end(), got) != tight.end();
  FUZZ_CHECK(got == want || got == also || alt, "lane %d %s gave %s, model %s", lane.id, name,
             errno_name(got), errno_name(want));
  lane_note(lane, name, got, !tight.empty());
}

void lane_map(const Plan& plan, Lane& lane, const LaneOp& op) {
  const IoasModel& m = *plan.m;
  const uint64_t iova = lane_iova(lane, op.a);
  const uint64_t len = clamp_to_window(lane, iova, lane_npages(op.b) * kPageSize);
  const MemorySource src = lane_source(lane, op.c, len);
  const uint32_t prot = pick_prot(op.d);
  // The library's order (predict_map_errno), with the lane's areas.
  int want = 0;
  const uint64_t align = m.alignment();
  const IovaRange range{iova, iova + src.length() - 1};
  if ((prot & ~3U) != 0 || (prot & 3U) == 0) {
    want = EINVAL;
  } else if ((prot & kProtWrite) != 0 && !src.writable()) {
    want = EPERM;
  } else if (!is_aligned(src.length(), align) || !is_aligned(dma_address(src), align) ||
             !is_aligned(iova, align) || any_overlap(m.reserved(), range)) {
    want = EINVAL;
  } else if (!overlapping(lane.areas, range).empty()) {
    want = EEXIST;
  } else if (!m.domains.empty() && source_faults(src, (prot & kProtWrite) != 0)) {
    want = EFAULT;
  }
  // Past the placement checks: the shared mapping limit, then the charge.
  std::vector<int> tight;
  if (want == 0 || want == EFAULT) {
    if (plan.tight_maps) tight.push_back(ENOSPC);
    if (plan.tight_charge && !m.domains.empty()) tight.push_back(ENOMEM);
  }
  const auto& r = note(m.ioas->map(src, prot, iova));
  FUZZ_CHECK(r.code() == want || std::find(tight.begin(), tight.end(), r.code()) != tight.end(),
             "lane %d map of [%#lx, +%#lx) prot %u from kind-%d memory at %#lx gave %s, model %s",
             lane.id, iova, src.length(), prot, static_cast<int>(src.kind()), dma_address(src),
             errno_name(r.code()), errno_name(want));
  lane_expect(lane, "map", r.code(), want, tight);
  if (!r) return;
  FUZZ_CHECK(*r == iova, "lane %d: fixed map at %#lx landed at %#lx", lane.id, iova, *r);
  lane.areas.emplace(iova, AreaModel{iova, src.length(), prot, src, m.owner()});
}

void lane_unmap(const Plan& plan, Lane& lane, const LaneOp& op) {
  IoasModel& m = *plan.m;
  const uint64_t iova = lane_iova(lane, op.a);
  uint64_t len = lane_npages(op.b) * kPageSize;
  if (op.b >= 0xe0) {
    const AreaModel* a = area_at(lane.areas, iova);
    len = a != nullptr ? a->last() - iova + 1 : 0;
  }
  len = clamp_to_window(lane, iova, len);
  const bool allow_empty = (op.c & 1) != 0;
  uint64_t want_bytes = 0;
  const int want = predict_unmap(lane.areas, iova, len, allow_empty, &want_bytes);
  const auto range = range_of(iova, len);
  if (range) g_unmap_request = *range;
  const auto& r =
      note(allow_empty ? m.ioas->unmap_range_allow_empty(iova, len) : m.ioas->unmap(iova, len));
  g_unmap_request.reset();
  FUZZ_CHECK(r.code() == want && (!r.ok() || *r == want_bytes),
             "lane %d unmap(%#lx, %#lx) gave %s / %#lx, model %s / %#lx", lane.id, iova, len,
             errno_name(r.code()), r.ok() ? *r : 0, errno_name(want), want_bytes);
  lane_note(lane, "unmap", r.code(), false);
  if (!r) return;
  // Every access let go of its pins there, then the areas and their span's
  // dirty pages go.
  FUZZ_CHECK(!world_pins_overlap(m, *range), "lane %d: a pin survived the unmap of [%#lx, %#lx]",
             lane.id, range->start, range->last);
  if (lane.access) {
    std::lock_guard lk(lane.access->mu);
    for (const auto& [piova, plen] : lane.access->pins) {
      FUZZ_CHECK(!(IovaRange{piova, piova + plen - 1}.overlaps(*range)),
                 "lane %d: its pin [%#lx, +%#lx) survived its unmap", lane.id, piova, plen);
    }
  }
  std::optional<uint64_t> first, last;
  for (const auto& [start, a] : lane.areas) {
    if (!range->contains(a.range())) continue;
    if (!first) first = a.iova >> kPageShift;
    last = a.last() >> kPageShift;
  }
  if (first) lane.dirty.erase(lane.dirty.lower_bound(*first), lane.dirty.upper_bound(*last));
  std::erase_if(lane.areas, [&](const auto& e) { return range->contains(e.second.range()); });
}

void lane_pin(const Plan& plan, Lane& lane, const LaneOp& op) {
  if (!lane.access) return lane_note(lane, "pin", -1, false);
  const uint64_t iova = lane_iova(lane, op.a);
  const uint64_t len = clamp_to_window(lane, iova, lane_npages(op.b) * kPageSize);
  const uint32_t prot = pick_prot(op.c);
  const IovaRange range{iova, iova + len - 1};
  int want = 0;
  if (prot == 0 || (prot & ~3U) != 0) {
    want = EINVAL;
  } else {
    want = walk(lane.areas, range, prot, false);
  }
  AccessModel& acc = *lane.access;
  std::lock_guard lk(acc.mu);
  if (len != 0) acc.note_try(range);
  const auto& r = note(acc.access->pin(iova, len, prot));
  if (want != 0) return lane_expect(lane, "pin", r.code(), want, {});
  // A pin of new pages may fault, as in a single-threaded step; ENOMEM only
  // where the round is tight.
  std::vector<int> tight;
  if (plan.tight_charge) tight.push_back(ENOMEM);
  lane_expect(lane, "pin", r.code(), 0, tight, EFAULT);
  if (!r) return;
  FUZZ_CHECK(r->size() == overlapping(lane.areas, range).size(),
             "lane %d: pin returned %zu segments", lane.id, r->size());
  acc.pins.emplace_back(iova, len);
}

void lane_unpin(Lane& lane, const LaneOp& op) {
  if (!lane.access) return lane_note(lane, "unpin", -1, false);
  AccessModel& acc = *lane.access;
  std::lock_guard lk(acc.mu);
  uint64_t iova = 0;
  uint64_t len = 0;
  if (op.a < 0x80 && !acc.pins.empty()) {
    std::tie(iova, len) = acc.pins[op.a % acc.pins.size()];
  } else {
    iova = lane_iova(lane, op.b);
    len = lane_npages(op.c) * kPageSize;
  }
  auto it = std::find(acc.pins.begin(), acc.pins.end(), std::make_pair(iova, len));
  const int want = it == acc.pins.end() ? EINVAL : 0;
  const Status& s = note(acc.access->unpin(iova, len));
  lane_expect(lane, "unpin", s.code(), want, {});
  if (s) acc.pins.erase(it);
}

void fill_pattern(uint8_t* p, size_t n, uint8_t seed) {
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(seed + i * 5);
}

void lane_rw(const Plan& plan, Lane& lane, const LaneOp& op) {
  if (!lane.access) return lane_note(lane, "rw", -1, false);
  const bool write = (op.a & 1) != 0;
  const uint64_t iova = lane_iova(lane, op.b);
  const uint64_t len = lane_rw_len(lane, op.c, iova);
  const IovaRange range{iova, iova + len - 1};
  int want = walk(lane.areas, range, write ? kProtWrite : kProtRead, true);
  if (want == 0 && user_memory_faults(lane.areas, range, write)) want = EFAULT;
  fill_pattern(lane.buf.data(), len, op.a);
  Access& acc = *lane.access->access;
  const Status& s =
      note(write ? acc.write(iova, lane.buf.data(), len) : acc.read(iova, lane.buf.data(), len));
  lane_expect(lane, write ? "write" : "read", s.code(), want, {});
  if (write && plan.m->dirty_tracking && (want == 0 || want == EFAULT)) {
    for (uint64_t p = iova >> kPageShift; p <= range.last >> kPageShift; ++p) lane.dirty.insert(p);
  }
  if (s && own_bytes(lane, iova, len)) {
    check_host_bytes(lane.areas, iova, lane.buf.data(), len, "lane rw");
  }
}

void lane_dma(const Plan& plan, Lane& lane, const LaneOp& op) {
  const IoasModel& m = *plan.m;
  if (m.domains.empty()) return lane_note(lane, "dma", -1, false);
  DomainModel& d = *m.domains.front();
  const bool write = (op.a & 1) != 0;
  const uint64_t iova = lane_iova(lane, op.b);
  const uint64_t len = lane_rw_len(lane, op.c, iova);
  bool fault = false;
  const int want = predict_dma(d, lane.areas, iova, len, write ? kProtWrite : kProtRead, &fault);
  fill_pattern(lane.buf.data(), len, op.a);
  const Status& s = note(write ? d.domain->dma_write(iova, lane.buf.data(), len)
                               : d.domain->dma_read(iova, lane.buf.data(), len));
  lane_expect(lane, write ? "dma_write" : "dma_read", s.code(), want, {});
  if (fault) ++lane.faults[&d];
  if (s && write && m.dirty_tracking) {
    for (uint64_t p = iova >> kPageShift; p <= (iova + len - 1) >> kPageShift; ++p) {
      lane.dirty.insert(p);
    }
  }
  if (s && own_bytes(lane, iova, len)) {
    check_host_bytes(lane.areas, iova, lane.buf.data(), len, "lane dma");
  }
}

void lane_dirty(const Plan& plan, Lane& lane, const LaneOp& op) {
  const IoasModel& m = *plan.m;
  const bool peek = (op.a & 1) != 0;
  const uint64_t iova = lane_iova(lane, op.b) & ~(kPageSize - 1);
  const uint64_t len = clamp_to_window(lane, iova, lane_npages(op.c) * kPageSize);
  const uint64_t first = iova >> kPageShift;
  const uint64_t npages = len >> kPageShift;
  std::vector<uint64_t> bitmap((npages + 63) / 64, 0xa5a5a5a5a5a5a5a5ULL);
  const int want = m.dirty_tracking ? 0 : EINVAL;
  const Status& s = note(peek ? m.ioas->peek_dirty(iova, len, bitmap)
                              : m.ioas->read_and_clear_dirty(iova, len, bitmap));
  lane_expect(lane, peek ? "peek_dirty" : "read_dirty", s.code(), want, {});
  if (!s) return;
  // Written since the last read, or pinned by any access: the window's pins
  // change only by this lane's own calls and callbacks.
  const std::set<uint64_t> pinned = pinned_pages(m, lane.access.get(), first, npages);
  for (uint64_t i = 0; i < npages; ++i) {
    const bool bit = ((bitmap[i / 64] >> (i % 64)) & 1) != 0;
    const bool expect = lane.dirty.count(first + i) != 0 || pinned.count(first + i) != 0;
    FUZZ_CHECK(bit == expect, "lane %d dirty bit of page %#lx is %d, model %d", lane.id,
               (first + i) << kPageShift, bit, expect);
  }
  if (!peek)
    lane.dirty.erase(lane.dirty.lower_bound(first), lane.dirty.lower_bound(first + npages));
}

void run_lane_op(const Plan& plan, Lane& lane, const LaneOp& op) {
  switch (op.kind) {
    case kLMap:
      return lane_map(plan, lane, op);
    case kLUnmap:
      return lane_unmap(plan, lane, op);
    case kLPin:
      return lane_pin(plan, lane, op);
    case kLUnpin:
      return lane_unpin(lane, op);
    case kLRw:
      return lane_rw(plan, lane, op);
    case kLDma:
      return lane_dma(plan, lane, op);
    case kLDirty:
      return lane_dirty(plan, lane, op);
    case kLaneOpCount:
      break;
  }
}

// Creates a lane's access for the round, predicted as op_access_create.
void create_lane_access(IoasModel& m, const std::shared_ptr<IoasModel>& io, Lane& lane,
                        uint8_t behaviour) {
  auto model = std::make_unique<AccessModel>();
  model->refuse_alternate = (behaviour & 1) != 0;
  model->probe_in_callback = (behaviour & 2) != 0;
  AccessModel* raw = model.get();
  const auto& a = Access::create(m.ioas, [raw](const IovaRange& r) { raw->on_unmap(r); });
  bool aligned = true;
  for (const auto& [s, area] : m.areas) {
    aligned = aligned && is_aligned(area.iova, kPageSize) && is_aligned(area.len, kPageSize) &&
              is_aligned(dma_address(area.src), kPageSize);
  }
  FUZZ_CHECK(aligned ? (a.ok() || a.code() == ENOMEM) : a.code() == EADDRINUSE,
             "lane Access::create over %s mappings gave %s", aligned ? "aligned" : "unaligned",
             errno_name(a.code()));
  if (!a) return;
  {
    std::lock_guard lk(model->mu);
    model->access = *a;
  }
  model->io = io;
  ++m.accesses;
  lane.access = std::move(model);
}

// Whether a pin of an access no lane owns spans two regions (lane windows,
// the shared window, the rest): a lane's unmap could then release pages of
// another lane's window, which that lane's model could not follow.
bool pin_spans_regions(const IoasModel& m) {
  const auto region_index = [](uint64_t iova) {
    if (iova < kWindowBase) return -1;
    const uint64_t r = (iova - kWindowBase) / kWindowSize;
    return r <= kSharedRegion ? static_cast<int>(r) : -1;
  };
  for (AccessModel* acc : w->accesses_of(&m)) {
    for (const auto& [iova, len] : acc->pins) {
      if (region_index(iova) != region_index(iova + len - 1)) return true;
    }
  }
  return false;
}

// Upper bounds of the round's new pinned bytes and new mappings.
void plan_budget(Plan& plan, const Lane* lanes, const Conflict& k) {
  const IoasModel& m = *plan.m;
  uint64_t bytes = 0;
  uint64_t maps = 0;
  for (int t = 0; t < plan.lanes; ++t) {
    for (const LaneOp& op : lanes[t].ops) {
      if (op.kind == kLMap) {
        ++maps;
        if (!m.domains.empty()) bytes += lane_npages(op.b) * kPageSize;
      }
      if (op.kind == kLPin) bytes += lane_npages(op.b) * kPageSize;
      if (op.kind == kLRw) bytes += kLaneRwMax;
    }
  }
  if (k.kind == kMapVsUnmap || k.kind == kMapVsMap) {
    maps += 2;
    bytes += 2 * kKiB * 64;
  }
  if (k.kind != kNoConflict) bytes += 64 * kKiB;
  const Counters c = counters();
  if (fx->charged) {
    for (int o = 0; o < 2; ++o) {
      const AccountMode mode =
          o == kProcessOwner ? AccountMode::per_process : AccountMode::per_user;
      uint64_t charged = 0;
      for (const OwnerCounters& oc : c.owners) {
        if (oc.mode == mode) charged += oc.charged_bytes;
      }
      if (charged + bytes > w->limit[o].value_or(fx->rlimit)) plan.tight_charge = true;
    }
  }
  if (c.pinned_bytes + bytes > fx->rlimit) plan.tight_charge = true;
  plan.tight_maps = m.areas.size() + maps > m.max_mappings;
}

}  // namespace

// Input: the IOAS slot and flags (bit 1: three lanes; bit 2: each lane gets an
// access for the round; bits 3-4: its callback behaviour), the slot count,
// the conflict (kind, slot, 3 argument bytes), then each lane's operations
// (5 bytes each, one per slot; lanes 0 and 1 have none at the conflict's slot).
void op_round(Reader& in) {
  const uint8_t flags = in.u8();
  const std::shared_ptr<IoasModel> io = w->ioas[flags & 1];
  Plan plan;
  plan.m = io.get();
  plan.lanes = (flags & 2) != 0 ? 3 : 2;
  plan.slots = 1 + in.u8() % kMaxSlots;
  Conflict k;
  const uint8_t kb = in.u8();
  k.kind = static_cast<ConflictKind>(kb % 8 < kConflictCount ? kb % 8 : 0);
  k.slot = (kb >> 3) % plan.slots;
  if (k.kind != kNoConflict) {
    k.a = in.u8();
    k.b = in.u8();
    k.c = in.u8();
  }
  Lane lanes[kMaxLanes];
  for (int t = 0; t < plan.lanes; ++t) {
    lanes[t].id = t;
    lanes[t].window = region(t);
    lanes[t].ops.resize(plan.slots);
    for (int s = 0; s < plan.slots; ++s) {
      if (k.kind != kNoConflict && t < 2 && s == k.slot) continue;
      LaneOp& op = lanes[t].ops[s];
      op.kind = static_cast<LaneOpKind>(in.u8() % kLaneOpCount);
      op.a = in.u8();
      op.b = in.u8();
      op.c = in.u8();
      op.d = in.u8();
    }
  }
  IoasModel& m = *plan.m;
  if (pin_spans_regions(m)) {
    g_step_detail = "(skipped: a pin spans two windows)";
    return;
  }
  // Before the threads: the lanes' accesses, their views of the model, the
  // budget, the conflict's predictions.
  for (int t = 0; t < plan.lanes; ++t) {
    Lane& lane = lanes[t];
    if ((flags & 4) != 0) create_lane_access(m, io, lane, static_cast<uint8_t>(flags >> 3));
    for (const auto& [start, a] : m.areas) {
      if (a.range().overlaps(lane.window)) lane.areas.emplace(start, a);
    }
    const uint64_t p0 = lane.window.start >> kPageShift;
    const uint64_t p1 = lane.window.last >> kPageShift;
    lane.dirty.insert(m.dirty_pages.lower_bound(p0), m.dirty_pages.upper_bound(p1));
    for (const auto& [start, a] : m.areas) {
      if (!lane.window.contains(a.range()) && in_lane_memory(a, t)) lane.bytes_checked = false;
    }
  }
  plan_budget(plan, lanes, k);
  plan_conflict(k, plan, lanes);

  const int step = iomm::fuzz::g_step_index;
  std::barrier sync(plan.lanes);
  std::vector<std::thread> threads;
  ++g_round_id;
  g_round_running = true;
  for (int t = 0; t < plan.lanes; ++t) {
    threads.emplace_back([&, t] {
      Lane& lane = lanes[t];
      iomm::fuzz::g_step_name = "round lane";
      iomm::fuzz::g_step_index = step;
      for (int s = 0; s < plan.slots; ++s) {
        sync.arrive_and_wait();
        if (k.kind != kNoConflict && t < 2 && s == k.slot) {
          run_conflict(k, lane, t);
        } else {
          run_lane_op(plan, lane, lane.ops[s]);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  g_round_running = false;

  // Merge the lanes back, check and settle the conflict, end the accesses.
  for (int t = 0; t < plan.lanes; ++t) {
    Lane& lane = lanes[t];
    std::erase_if(m.areas, [&](const auto& e) { return e.second.range().overlaps(lane.window); });
    for (const auto& [start, a] : lane.areas) m.areas.emplace(start, a);
    const uint64_t p0 = lane.window.start >> kPageShift;
    const uint64_t p1 = lane.window.last >> kPageShift;
    m.dirty_pages.erase(m.dirty_pages.lower_bound(p0), m.dirty_pages.upper_bound(p1));
    m.dirty_pages.insert(lane.dirty.begin(), lane.dirty.end());
    for (const auto& [d, n] : lane.faults) d->expected_faults += n;
  }
  resolve_conflict(k, plan, lanes);
  std::string detail;
  for (int t = 0; t < plan.lanes; ++t) {
    detail +=
        (t == 0 ? "" : " ") + std::string("L") + std::to_string(t) + "[" + lanes[t].trace + "]";
    lanes[t].access.reset();
    g_raced = g_raced || lanes[t].racy;
  }
  if (k.kind != kNoConflict) {
    detail +=
        std::string(" K[") + kConflictNames[k.kind] +
        (k.skipped != nullptr ? std::string(" skipped: ") + k.skipped : std::string(" raced")) +
        "]";
  }
  g_step_detail = detail;
  g_last_code = 0;
}

}  // namespace iomm::fuzz::ioas_sequence
