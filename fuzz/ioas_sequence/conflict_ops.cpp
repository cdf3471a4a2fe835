// The conflicting pairs of a concurrent round: lanes 0 and 1 call at the
// same slot on the same range of the shared window. Each call's result alone
// is predicted before the threads start; the pair's allowed outcomes are
// those of the two orders, plus the overlap the contract names (EBUSY of an
// unmap that meets a mapping being created, EINVAL of a pin or rw of a range
// being unmapped). After the round the observed pair must be one of them;
// the model takes that outcome, and the shared window is settled (unmapped,
// or its dirty log read and cleared) with a predicted single-threaded call,
// so that the state after the round does not depend on the interleaving.
#include "ioas_sequence/concurrent.hpp"
#include "ioas_sequence/generators.hpp"
#include "ioas_sequence/operations.hpp"
#include "ioas_sequence/oracle.hpp"

namespace iomm::fuzz::ioas_sequence {

namespace {

constexpr uint64_t kConflictMaxLen = 64 * kKiB;

// The first area of m inside the shared window.
std::optional<AreaModel> shared_area(const IoasModel& m) {
  const IovaRange s = region(kSharedRegion);
  for (const auto& [start, a] : m.areas) {
    if (s.contains(a.range())) return a;
  }
  return std::nullopt;
}

// The map's result once the unmap of k.range went first: the areas inside
// the range and the pins overlapping them (their callbacks let go) are gone.
int predict_map_after_unmap(IoasModel& m, const Conflict& k) {
  const AreaMap saved_areas = m.areas;
  std::vector<std::pair<AccessModel*, std::vector<std::pair<uint64_t, uint64_t>>>> saved_pins;
  std::vector<std::pair<AccessModel*, std::map<uint64_t, uint32_t>>> saved_page_pins;
  for (AccessModel* acc : w->accesses_of(&m)) {
    saved_pins.emplace_back(acc, acc->pins);
    saved_page_pins.emplace_back(acc, acc->page_pins);
    std::erase_if(acc->pins, [&](const auto& p) {
      return IovaRange{p.first, p.first + p.second - 1}.overlaps(k.range);
    });
    std::erase_if(acc->page_pins,
                  [&](const auto& p) { return page_range(p.first).overlaps(k.range); });
  }
  std::erase_if(m.areas, [&](const auto& e) { return k.range.contains(e.second.range()); });
  const int want = predict_map_errno(m, *k.src[0], k.prot[0], k.range.start);
  m.areas = saved_areas;
  for (auto& [acc, pins] : saved_pins) acc->pins = std::move(pins);
  for (auto& [acc, pins] : saved_page_pins) acc->page_pins = std::move(pins);
  return want;
}

// One call of a pair in an order: which lane, its errno, an unmap's bytes.
struct Call {
  int lane;
  int code;
  uint64_t bytes;
};

// The pair's calls in the order they took effect.
struct Outcome {
  Call first, second;
};

bool matches(const Conflict& k, const Call& c) {
  return k.got[c.lane] == c.code &&
         (k.kind != kMapVsUnmap || c.lane != 1 || c.code != 0 || k.bytes[1] == c.bytes);
}

// A map that passed the checks before the overlap test: an overlapping map
// taking effect first makes it EEXIST.
bool past_overlap_check(int pred) {
  return pred == 0 || pred == EFAULT || pred == ENOMEM || pred == ENOSPC;
}

std::vector<Outcome> map_outcomes(const Conflict& k) {
  std::vector<Outcome> out;
  if (k.kind == kMapVsUnmap) {
    const int pm = k.pred[0];
    if (pm == 0) {
      // The unmap after the map removes it; during its fill, EBUSY.
      out.push_back({{0, 0, 0}, {1, 0, k.len}});
      out.push_back({{0, 0, 0}, {1, EBUSY, 0}});
    } else {
      out.push_back({{0, pm, 0}, {1, k.pred[1], k.pred_bytes}});
      // A map that fails while pinning had its placeholder in the tree.
      if (pm == EFAULT || pm == ENOMEM) out.push_back({{0, pm, 0}, {1, EBUSY, 0}});
    }
    out.push_back({{1, k.pred[1], k.pred_bytes}, {0, k.pred_after_unmap, 0}});
    return out;
  }
  for (int f = 0; f < 2; ++f) {
    const int o = 1 - f;
    const int pf = k.pred[f];
    const int po = k.pred[o];
    std::vector<int> seconds{po};
    if (pf == 0 && past_overlap_check(po)) seconds = {EEXIST};
    if ((pf == EFAULT || pf == ENOMEM) && past_overlap_check(po)) seconds.push_back(EEXIST);
    for (int c : seconds) out.push_back({{f, pf, 0}, {o, c, 0}});
  }
  return out;
}

std::string outcome_text(const Conflict& k) {
  std::string s;
  for (const Outcome& o : map_outcomes(k)) {
    s += " (";
    for (const Call& c : {o.first, o.second}) {
      s += std::string(" L") + std::to_string(c.lane) + " " + errno_name(c.code);
      if (c.code == 0 && c.bytes != 0) s += "/" + std::to_string(c.bytes);
    }
    s += ")";
  }
  return s;
}

// Applies a call of a map pair to the model.
void apply(const Conflict& k, IoasModel& m, const Call& c) {
  if (c.code != 0) return;
  if (k.kind == kMapVsUnmap && c.lane == 1) {
    if (c.bytes > 0) unmap_model(m, k.range);
    return;
  }
  m.areas.emplace(k.range.start,
                  AreaModel{k.range.start, k.len, k.prot[c.lane], *k.src[c.lane], m.owner()});
}

// Unmaps the pair's range (single-threaded, predicted), so the state after
// the round is the same whichever order the pair took.
void settle_unmap(IoasModel& m, const IovaRange& r) {
  uint64_t want_bytes = 0;
  const uint64_t len = r.last - r.start + 1;
  const int want = predict_unmap(m.areas, r.start, len, true, &want_bytes);
  g_unmap_request = r;
  const auto& got = m.ioas->unmap_range_allow_empty(r.start, len);
  g_unmap_request.reset();
  FUZZ_CHECK(got.code() == want && (!got.ok() || *got == want_bytes),
             "settling unmap of [%#lx, %#lx] gave %s / %#lx, model %s / %#lx", r.start, r.last,
             errno_name(got.code()), got.ok() ? *got : 0, errno_name(want), want_bytes);
  if (got.ok()) unmap_model(m, r);
}

int predict_pin(const AreaMap& areas, uint64_t iova, uint64_t len, uint32_t prot) {
  if (!is_aligned(iova, kPageSize) || !is_aligned(len, kPageSize)) return EINVAL;
  if (prot == 0 || (prot & ~3U) != 0) return EINVAL;
  return walk(areas, {iova, iova + len - 1}, prot, false);
}

int predict_rw(const AreaMap& areas, const IovaRange& r, bool write) {
  const int want = walk(areas, r, write ? kProtWrite : kProtRead, true);
  return want == 0 && user_memory_faults(areas, r, write) ? EFAULT : want;
}

bool bit_of(const std::vector<uint64_t>& bits, uint64_t i) {
  return ((bits[i / 64] >> (i % 64)) & 1) != 0;
}

// The dirty bits the pair's read returned, page by page: a pinned page or a
// page dirty before the round is set; a page the write marked may be set
// (marked before the read) or not (after it, so still in the log); others
// are clear. Then the log is read and cleared to settle the window: a page
// the write marked after a clearing read is still there, one it marked
// before is not (unless it was dirty before the round, when either holds).
void resolve_write_vs_dirty(Conflict& k, IoasModel& m) {
  const IovaRange written{k.range.start, k.range.start + k.len - 1};
  const auto marked = [&](uint64_t page) {
    return k.marks && page >= (written.start >> kPageShift) && page <= (written.last >> kPageShift);
  };
  if (k.got[1] == 0) {
    for (uint64_t i = 0; i < k.npages; ++i) {
      const uint64_t p = k.first_page + i;
      const bool bit = bit_of(k.bitmap, i);
      const bool must = k.pinned.count(p) != 0 || k.pre_dirty.count(p) != 0;
      FUZZ_CHECK(
          bit == must || (!must && marked(p)),
          "racing dirty read: bit of page %#lx is %d (pinned %d, dirty before %d, written %d)",
          p << kPageShift, bit, k.pinned.count(p) != 0, k.pre_dirty.count(p) != 0, marked(p));
    }
  }
  if (!m.dirty_tracking) return;
  std::vector<uint64_t> after((k.npages + 63) / 64, 0);
  const Status& s =
      m.ioas->read_and_clear_dirty(k.first_page << kPageShift, k.npages << kPageShift, after);
  FUZZ_CHECK(s.ok(), "settling dirty read failed: %s", s.ok() ? "" : s.error().describe().c_str());
  for (uint64_t i = 0; i < k.npages; ++i) {
    const uint64_t p = k.first_page + i;
    if (k.pinned.count(p) != 0) {
      FUZZ_CHECK(bit_of(after, i), "settling dirty read: pinned page %#lx clear", p << kPageShift);
      continue;
    }
    const bool pre = k.pre_dirty.count(p) != 0;
    const bool before = bit_of(k.bitmap, i);
    const bool bit = bit_of(after, i);
    bool ok = false;
    if (k.peek) {
      ok = bit == (pre || marked(p));
    } else if (!marked(p)) {
      ok = !bit;
    } else {
      ok = !before ? bit : (pre || !bit);
    }
    FUZZ_CHECK(ok,
               "settling dirty read: page %#lx is %d after a racing %s that returned %d (dirty "
               "before %d, written %d)",
               p << kPageShift, bit, k.peek ? "peek" : "read", before, pre, marked(p));
  }
  m.dirty_pages.erase(m.dirty_pages.lower_bound(k.first_page),
                      m.dirty_pages.lower_bound(k.first_page + k.npages));
}

// How often each pair ended in each outcome (IOMM_FUZZ_STATS=1): that the
// races do go both ways.
std::mutex g_outcomes_mu;
std::map<std::string, uint64_t> g_outcomes;

void count_outcome(const Conflict& k) {
  std::string key = std::string(kConflictNames[k.kind]) + ": L0 " + errno_name(k.got[0]) + ", L1 " +
                    errno_name(k.got[1]);
  std::lock_guard lk(g_outcomes_mu);
  ++g_outcomes[key];
}

}  // namespace

void print_conflict_stats() {
  std::lock_guard lk(g_outcomes_mu);
  for (const auto& [key, n] : g_outcomes) std::fprintf(stderr, "%-44s %8lu\n", key.c_str(), n);
}

void plan_conflict(Conflict& k, const Plan& plan, const Lane* lanes) {
  if (k.kind == kNoConflict) return;
  IoasModel& m = *plan.m;
  k.m = &m;
  const IovaRange shared = region(kSharedRegion);
  switch (k.kind) {
    case kUnmapVsPin:
    case kUnmapVsRw: {
      k.target = shared_area(m);
      if (!k.target) {
        k.skipped = "no mapping in the shared window";
        return;
      }
      if (!lanes[1].access) {
        k.skipped = "lane 1 has no access";
        return;
      }
      const AreaModel& a = *k.target;
      k.range = a.range();
      k.pred[0] = predict_unmap(m.areas, a.iova, a.len, false, &k.pred_bytes);
      if (k.kind == kUnmapVsPin) {
        k.len = (1 + k.a % 4) * kPageSize;
        k.prot[1] = pick_prot(k.b);
        k.pred[1] = predict_pin(m.areas, a.iova, k.len, k.prot[1]);
      } else {
        k.write = (k.b & 1) != 0;
        k.len = std::min<uint64_t>(a.len, (k.a % 16 + 1) * 0x7ff);
        k.pred[1] = predict_rw(m.areas, {a.iova, a.iova + k.len - 1}, k.write);
      }
      return;
    }
    case kMapVsUnmap:
    case kMapVsMap: {
      if (plan.tight_charge || plan.tight_maps) {
        k.skipped = "tight round";
        return;
      }
      k.len = std::min(lane_npages(k.b) * kPageSize, kConflictMaxLen);
      k.range = {shared.start + (k.a % 8) * kConflictMaxLen, 0};
      k.range.last = k.range.start + k.len - 1;
      k.src[0] = fx->file_rw_whole->slice(kSharedFileBase, k.len);
      k.prot[0] = 1 + k.c % 3;
      k.pred[0] = predict_map_errno(m, *k.src[0], k.prot[0], k.range.start);
      if (k.kind == kMapVsUnmap) {
        k.allow_empty = (k.c & 8) != 0;
        k.pred[1] = predict_unmap(m.areas, k.range.start, k.len, k.allow_empty, &k.pred_bytes);
        k.pred_after_unmap =
            k.pred[1] == 0 && k.pred_bytes > 0 ? predict_map_after_unmap(m, k) : k.pred[0];
      } else {
        k.src[1] = (k.c & 8) != 0
                       ? fx->file_rw_whole->slice(kSharedFileBase + kConflictMaxLen, k.len)
                       : fx->sim[1]->slice(kLaneSimBase + kMaxLanes * kLaneSimSize, k.len);
        k.prot[1] = 1 + (k.c >> 4) % 3;
        k.pred[1] = predict_map_errno(m, *k.src[1], k.prot[1], k.range.start);
      }
      return;
    }
    case kUnmapVsUnmap: {
      k.target = shared_area(m);
      if (!k.target) {
        k.skipped = "no mapping in the shared window";
        return;
      }
      k.range = k.target->range();
      k.allow_empty = (k.a & 1) != 0;
      k.pred[0] = predict_unmap(m.areas, k.range.start, k.target->len, false, &k.pred_bytes);
      k.pred[1] = k.pred[0];
      return;
    }
    case kWriteVsDirty: {
      k.target = shared_area(m);
      if (!k.target) {
        k.skipped = "no mapping in the shared window";
        return;
      }
      const AreaModel& a = *k.target;
      k.dma = (k.a & 1) != 0 && !m.domains.empty();
      if (!k.dma && !lanes[0].access) {
        k.skipped = "lane 0 has no access and no domain is attached";
        return;
      }
      k.len = std::min(a.len, lane_npages(k.b) * kPageSize);
      k.range = {a.iova, a.iova + k.len - 1};
      if (k.dma) {
        k.pred[0] = predict_dma(*m.domains.front(), m.areas, a.iova, k.len, kProtWrite, &k.fault);
        k.marks = m.dirty_tracking && k.pred[0] == 0;
      } else {
        k.pred[0] = predict_rw(m.areas, k.range, true);
        k.marks = m.dirty_tracking && (k.pred[0] == 0 || k.pred[0] == EFAULT);
      }
      k.peek = (k.c & 1) != 0;
      k.first_page = a.iova >> kPageShift;
      k.npages = std::min<uint64_t>((a.last() >> kPageShift) - k.first_page + 1, 256);
      k.pred[1] = m.dirty_tracking ? 0 : EINVAL;
      for (uint64_t p : m.dirty_pages) {
        if (p >= k.first_page && p - k.first_page < k.npages) k.pre_dirty.insert(p);
      }
      k.pinned = pinned_pages(m, nullptr, k.first_page, k.npages);
      return;
    }
    case kNoConflict:
    case kConflictCount:
      break;
  }
}

void run_conflict(Conflict& k, Lane& lane, int i) {
  if (k.skipped != nullptr) return;
  Ioas& ioas = *k.m->ioas;
  const bool unmapping = (i == 0 && (k.kind == kUnmapVsPin || k.kind == kUnmapVsRw)) ||
                         (i == 1 && k.kind == kMapVsUnmap) || k.kind == kUnmapVsUnmap;
  if (unmapping) {
    g_unmap_request = k.range;
    const uint64_t len = k.range.last - k.range.start + 1;
    const auto& r = note(i == 1 && k.allow_empty ? ioas.unmap_range_allow_empty(k.range.start, len)
                                                 : ioas.unmap(k.range.start, len));
    g_unmap_request.reset();
    k.got[i] = r.code();
    k.bytes[i] = r.ok() ? *r : 0;
    return;
  }
  switch (k.kind) {
    case kUnmapVsPin: {
      // Pin and record under the access's lock, which its callback takes.
      AccessModel& acc = *lane.access;
      std::lock_guard lk(acc.mu);
      if (k.len != 0) acc.note_try({k.range.start, k.range.start + k.len - 1});
      const auto& r = note(acc.access->pin(k.range.start, k.len, k.prot[1]));
      k.got[1] = r.code();
      if (r) acc.pins.emplace_back(k.range.start, k.len);
      return;
    }
    case kUnmapVsRw: {
      Access& acc = *lane.access->access;
      const Status& s = note(k.write ? acc.write(k.range.start, lane.buf.data(), k.len)
                                     : acc.read(k.range.start, lane.buf.data(), k.len));
      k.got[1] = s.code();
      return;
    }
    case kMapVsUnmap:
    case kMapVsMap:
      k.got[i] = note(ioas.map(*k.src[i], k.prot[i], k.range.start)).code();
      return;
    case kWriteVsDirty: {
      if (i == 0) {
        const Status& s = note(
            k.dma ? k.m->domains.front()->domain->dma_write(k.range.start, lane.buf.data(), k.len)
                  : lane.access->access->write(k.range.start, lane.buf.data(), k.len));
        k.got[0] = s.code();
        return;
      }
      k.bitmap.assign((k.npages + 63) / 64, 0xa5a5a5a5a5a5a5a5ULL);
      const uint64_t iova = k.first_page << kPageShift;
      const uint64_t len = k.npages << kPageShift;
      k.got[1] = note(k.peek ? ioas.peek_dirty(iova, len, k.bitmap)
                             : ioas.read_and_clear_dirty(iova, len, k.bitmap))
                     .code();
      return;
    }
    case kUnmapVsUnmap:  // both unmap, above
    case kNoConflict:
    case kConflictCount:
      break;
  }
}

void resolve_conflict(Conflict& k, const Plan& plan, Lane* lanes) {
  if (k.kind == kNoConflict || k.skipped != nullptr) return;
  count_outcome(k);
  IoasModel& m = *plan.m;
  switch (k.kind) {
    case kUnmapVsPin:
    case kUnmapVsRw: {
      // The unmap always wins: a pin or rw before it is released by the
      // callback (or is over), one during it sees the range being unmapped
      // (EINVAL), one after it finds nothing (ENOENT).
      FUZZ_CHECK(k.got[0] == k.pred[0] && k.bytes[0] == k.pred_bytes,
                 "unmap racing with a %s gave %s / %#lx, model %s / %#lx",
                 k.kind == kUnmapVsPin ? "pin" : "rw", errno_name(k.got[0]), k.bytes[0],
                 errno_name(k.pred[0]), k.pred_bytes);
      std::vector<int> allowed{k.pred[1], EINVAL, ENOENT};
      if (k.kind == kUnmapVsPin && k.pred[1] == 0) {
        allowed.push_back(EFAULT);
        if (plan.tight_charge) allowed.push_back(ENOMEM);
      }
      FUZZ_CHECK(std::find(allowed.begin(), allowed.end(), k.got[1]) != allowed.end(),
                 "%s of [%#lx, +%#lx) racing with its unmap gave %s (alone: %s)",
                 k.kind == kUnmapVsPin ? "pin"
                 : k.write             ? "write"
                                       : "read",
                 k.range.start, k.len, errno_name(k.got[1]), errno_name(k.pred[1]));
      if (k.pred[0] == 0) {
        {
          std::lock_guard lk(lanes[1].access->mu);
          for (const auto& [iova, len] : lanes[1].access->pins) {
            FUZZ_CHECK(!(IovaRange{iova, iova + len - 1}.overlaps(k.range)),
                       "a pin [%#lx, +%#lx) that won the race survived the unmap", iova, len);
          }
        }
        unmap_model(m, k.range);
      }
      return;
    }
    case kMapVsUnmap:
    case kMapVsMap: {
      const std::vector<Outcome> outs = map_outcomes(k);
      const auto it = std::find_if(outs.begin(), outs.end(), [&](const Outcome& o) {
        return matches(k, o.first) && matches(k, o.second);
      });
      FUZZ_CHECK(it != outs.end(), "%s race on [%#lx, %#lx]: L0 %s, L1 %s / %#lx; allowed:%s",
                 kConflictNames[k.kind], k.range.start, k.range.last, errno_name(k.got[0]),
                 errno_name(k.got[1]), k.bytes[1], outcome_text(k).c_str());
      apply(k, m, it->first);
      apply(k, m, it->second);
      settle_unmap(m, k.range);
      return;
    }
    case kUnmapVsUnmap: {
      // One removes the area; the other meets it being removed (EBUSY) or
      // finds nothing left (ENOENT, or 0 bytes for unmap_range_allow_empty).
      const auto won = [&](int i) { return k.got[i] == 0 && k.bytes[i] == k.pred_bytes; };
      const auto lost = [&](int i) {
        return k.got[i] == EBUSY ||
               (i == 1 && k.allow_empty ? k.got[i] == 0 && k.bytes[i] == 0 : k.got[i] == ENOENT);
      };
      FUZZ_CHECK((won(0) && lost(1)) || (won(1) && lost(0)),
                 "two unmaps of [%#lx, %#lx] gave %s / %#lx and %s / %#lx (the area: %#lx)",
                 k.range.start, k.range.last, errno_name(k.got[0]), k.bytes[0],
                 errno_name(k.got[1]), k.bytes[1], k.pred_bytes);
      unmap_model(m, k.range);
      return;
    }
    case kWriteVsDirty: {
      FUZZ_CHECK(k.got[0] == k.pred[0] && k.got[1] == k.pred[1],
                 "write racing with a dirty read gave %s / %s, model %s / %s", errno_name(k.got[0]),
                 errno_name(k.got[1]), errno_name(k.pred[0]), errno_name(k.pred[1]));
      if (k.fault) ++m.domains.front()->expected_faults;
      resolve_write_vs_dirty(k, m);
      return;
    }
    case kNoConflict:
    case kConflictCount:
      break;
  }
}

}  // namespace iomm::fuzz::ioas_sequence
