#include "ioas_sequence/oracle.hpp"

namespace iomm::fuzz::ioas_sequence {

std::optional<IovaRange> range_of(uint64_t iova, uint64_t len) { return make_range(iova, len); }

namespace {

struct PageRun {
  const void* obj;
  bool simulated;
  int owner;
  uint64_t first;
  uint64_t last;
};

void add_run(std::vector<PageRun>& runs, const MemorySource& src, uint64_t skip, uint64_t len,
             int owner) {
  const uint64_t off = src.offset() + skip;
  runs.push_back({src.object().get(), src.kind() == SourceKind::simulated, owner, off >> kPageShift,
                  (off + len - 1) >> kPageShift});
}

// Distinct pages of the runs matching pred, split into (real, simulated).
template <typename Pred>
std::pair<uint64_t, uint64_t> distinct_pages(std::vector<PageRun> runs, Pred pred) {
  std::erase_if(runs, [&](const PageRun& r) { return !pred(r); });
  std::sort(runs.begin(), runs.end(), [](const PageRun& a, const PageRun& b) {
    return a.obj != b.obj ? a.obj < b.obj : a.first < b.first;
  });
  uint64_t real = 0;
  uint64_t sim = 0;
  for (size_t i = 0; i < runs.size();) {
    // Merge the overlapping or adjacent runs of one object.
    uint64_t last = runs[i].last;
    size_t j = i + 1;
    for (; j < runs.size() && runs[j].obj == runs[i].obj && runs[j].first <= last + 1; ++j) {
      last = std::max(last, runs[j].last);
    }
    (runs[i].simulated ? sim : real) += last - runs[i].first + 1;
    i = j;
  }
  return {real, sim};
}

// Pins the model says are held: domain-held areas and access pins.
std::vector<PageRun> expected_runs() {
  std::vector<PageRun> runs;
  for (IoasModel* m : w->live_ioas()) {
    if (!m->domains.empty()) {
      for (const auto& [start, a] : m->areas) add_run(runs, a.src, 0, a.len, a.owner);
    }
    for (AccessModel* acc : w->accesses_of(m)) {
      for (const auto& [iova, len] : acc->pins) {
        const IovaRange r{iova, iova + len - 1};
        for (const AreaModel* a : m->overlapping(r)) {
          const uint64_t s = std::max(a->iova, r.start);
          const uint64_t l = std::min(a->last(), r.last);
          add_run(runs, a->src, s - a->iova, l - s + 1, a->owner);
        }
      }
      for (const auto& [page, count] : acc->page_pins) {
        const AreaModel* a = m->find(page);
        FUZZ_CHECK(a != nullptr, "model: page pin at %#lx outside every mapping", page);
        add_run(runs, a->src, page - a->iova, kPageSize, a->owner);
      }
    }
  }
  return runs;
}

std::vector<IovaRange> holes_of(std::vector<IovaRange> reserved) {
  std::sort(reserved.begin(), reserved.end(),
            [](const IovaRange& a, const IovaRange& b) { return a.start < b.start; });
  std::vector<IovaRange> holes;
  uint64_t pos = 0;
  for (const IovaRange& r : reserved) {
    if (r.start > pos) holes.push_back({pos, r.start - 1});
    if (r.last == kMax) return holes;
    pos = std::max(pos, r.last + 1);
  }
  holes.push_back({pos, kMax});
  return holes;
}

}  // namespace

bool any_overlap(const std::vector<IovaRange>& v, const IovaRange& r) {
  return std::any_of(v.begin(), v.end(), [&](const IovaRange& x) { return x.overlaps(r); });
}

void check_translation(DomainModel& d, uint64_t iova, uint32_t access) {
  const IoasModel* m = d.attached;
  const AreaModel* a = (m != nullptr && d.in_aperture(iova)) ? m->find(iova) : nullptr;
  const uint64_t faults_before = d.domain->counters().faults;
  const auto& t = note(d.domain->translate(iova, access));
  if (a == nullptr) {
    FUZZ_CHECK(t.code() == EFAULT, "translate(%#lx) of an unmapped IOVA gave %s", iova,
               errno_name(t.code()));
  } else if ((a->prot & access) != access) {
    FUZZ_CHECK(t.code() == EPERM, "translate(%#lx, %u) of a prot-%u mapping gave %s", iova, access,
               a->prot, errno_name(t.code()));
  } else {
    FUZZ_CHECK(t.ok(), "translate(%#lx, %u) of a mapped IOVA failed: %s", iova, access,
               t.error().describe().c_str());
    const uint64_t want = dma_address(a->src, iova - a->iova);
    const bool sim = a->src.kind() == SourceKind::simulated;
    FUZZ_CHECK(t->iova == iova && t->address == want && t->prot == a->prot,
               "translate(%#lx) = {iova %#lx, address %#lx, prot %u}, model says {%#lx, %u}", iova,
               t->iova, t->address, t->prot, want, a->prot);
    FUZZ_CHECK(t->host == (sim ? nullptr : reinterpret_cast<void*>(want)),
               "translate(%#lx) host %p, expected %#lx", iova, t->host, sim ? 0 : want);
    const uint64_t leaf = t->leaf_size;
    FUZZ_CHECK((leaf == kPageSize || leaf == kPageSize2M || leaf == kPageSize1G) &&
                   (d.cfg.page_sizes & leaf) != 0,
               "translate(%#lx): leaf size %#lx not allowed (page_sizes %#lx)", iova, leaf,
               d.cfg.page_sizes);
    FUZZ_CHECK(t->contiguous >= 1 && t->contiguous <= leaf && ((iova + t->contiguous) % leaf) == 0,
               "translate(%#lx): contiguous %#lx inconsistent with leaf %#lx", iova, t->contiguous,
               leaf);
    const uint64_t leaf_start = iova + t->contiguous - leaf;
    FUZZ_CHECK(leaf_start >= a->iova && iova + t->contiguous - 1 <= a->last(),
               "translate(%#lx): leaf [%#lx, +%#lx) crosses the mapping [%#lx, %#lx]", iova,
               leaf_start, leaf, a->iova, a->last());
  }
  if (!t.ok()) ++d.expected_faults;
  FUZZ_CHECK(d.domain->counters().faults == faults_before + (t.ok() ? 0 : 1),
             "translate fault not recorded exactly once");
}

namespace {

void check_ioas(IoasModel& m) {
  const auto maps = m.ioas->mappings();
  FUZZ_CHECK(maps.size() == m.areas.size(), "mappings(): %zu, model %zu", maps.size(),
             m.areas.size());
  std::vector<AccessModel*> accs = w->accesses_of(&m);
  uint64_t bytes = 0;
  size_t i = 0;
  for (const auto& [start, a] : m.areas) {
    const MappingInfo& mi = maps[i++];
    uint32_t access_pins = 0;
    for (AccessModel* acc : accs) {
      for (const auto& [iova, len] : acc->pins) {
        if (IovaRange{iova, iova + len - 1}.overlaps(a.range())) ++access_pins;
      }
      // One per page held by pin_pages (not per count).
      for (auto it = acc->page_pins.lower_bound(a.iova);
           it != acc->page_pins.end() && it->first <= a.last(); ++it) {
        ++access_pins;
      }
    }
    FUZZ_CHECK(
        mi.iova == a.iova && mi.length == a.len && mi.prot == a.prot && mi.kind == a.src.kind() &&
            mi.pinned == !m.domains.empty() && mi.access_pins == access_pins,
        "mapping %zu = {%#lx, %#lx, prot %u, kind %d, pinned %d, access_pins %u}, model "
        "{%#lx, %#lx, prot %u, kind %d, pinned %d, access_pins %u}",
        i - 1, mi.iova, mi.length, mi.prot, static_cast<int>(mi.kind), mi.pinned, mi.access_pins,
        a.iova, a.len, a.prot, static_cast<int>(a.src.kind()), !m.domains.empty(), access_pins);
    bytes += a.len;
  }
  const IoasCounters c = m.ioas->counters();
  FUZZ_CHECK(c.mappings == m.areas.size() && c.mapped_bytes == bytes &&
                 c.domains == m.domains.size() && c.accesses == m.accesses &&
                 c.iova_alignment == m.alignment(),
             "IOAS counters {maps %lu, bytes %#lx, domains %lu, accesses %lu, align %#lx}, model "
             "{%zu, %#lx, %zu, %lu, %#lx}",
             c.mappings, c.mapped_bytes, c.domains, c.accesses, c.iova_alignment, m.areas.size(),
             bytes, m.domains.size(), m.accesses, m.alignment());
  const auto invalid = static_cast<uint64_t>(std::count_if(
      m.areas.begin(), m.areas.end(), [](const auto& e) { return e.second.host_invalid; }));
  FUZZ_CHECK(m.ioas->invalid_host_count() == invalid, "invalid_host_count() %lu, model %lu",
             m.ioas->invalid_host_count(), invalid);
  FUZZ_CHECK(m.ioas->iova_ranges() == holes_of(m.reserved()),
             "iova_ranges() disagrees with the reserved ranges");
}

}  // namespace

void check_all() {
  for (IoasModel* m : w->live_ioas()) check_ioas(*m);
  for (const auto& acc : w->access) {
    if (!acc) continue;
    uint64_t bytes = 0;
    for (const auto& p : acc->pins) bytes += p.second;
    FUZZ_CHECK(acc->access->pin_count() == acc->pins.size() && acc->access->pinned_bytes() == bytes,
               "access pins %lu / %#lx bytes, model %zu / %#lx", acc->access->pin_count(),
               acc->access->pinned_bytes(), acc->pins.size(), bytes);
    FUZZ_CHECK(acc->access->page_pinned_count() == acc->page_pins.size(),
               "access page pins %lu, model %zu", acc->access->page_pinned_count(),
               acc->page_pins.size());
  }
  for (DomainModel* d : w->live_domains()) {
    uint64_t bytes = 0;
    if (d->attached != nullptr) {
      for (const auto& [s, a] : d->attached->areas) bytes += a.len;
    }
    const DomainCounters dc = d->domain->counters();
    FUZZ_CHECK(dc.mapped_bytes == bytes, "domain maps %#lx bytes, model %#lx", dc.mapped_bytes,
               bytes);
    FUZZ_CHECK(dc.faults == d->expected_faults, "domain recorded %lu faults, model %lu", dc.faults,
               d->expected_faults);
    if (d->attached != nullptr) {
      // Probe the edges of (up to) the first 6 mappings and the step's IOVA.
      std::vector<uint64_t> probes{w->probe_iova};
      size_t n = 0;
      for (const auto& [s, a] : d->attached->areas) {
        if (n++ == 6) break;
        probes.insert(probes.end(), {a.iova, a.last(), a.iova - 1, a.last() + 1});
      }
      for (uint64_t iova : probes) {
        check_translation(*d, iova, kProtRead);
        check_translation(*d, iova, kProtWrite);
      }
    }
  }

  const std::vector<PageRun> runs = expected_runs();
  const auto [real, sim] = distinct_pages(runs, [](const PageRun&) { return true; });
  const Counters c = counters();
  FUZZ_CHECK(c.pinned_bytes == real * kPageSize && c.simulated_pinned_bytes == sim * kPageSize,
             "pinned %#lx (+%#lx simulated), model %#lx (+%#lx)", c.pinned_bytes,
             c.simulated_pinned_bytes, real * kPageSize, sim * kPageSize);
  FUZZ_CHECK(c.vmlck_bytes == c.pinned_bytes, "VmLck %#lx != pinned %#lx", c.vmlck_bytes,
             c.pinned_bytes);
  uint64_t total = 0;
  for (int o = 0; o < 2; ++o) {
    const auto [r, s] = distinct_pages(runs, [o](const PageRun& x) { return x.owner == o; });
    const uint64_t want = (r + s) * kPageSize;
    const AccountMode mode = o == kProcessOwner ? AccountMode::per_process : AccountMode::per_user;
    const int id = o == kProcessOwner ? static_cast<int>(getpid()) : static_cast<int>(getuid());
    uint64_t got = 0;
    for (const OwnerCounters& oc : c.owners) {
      if (oc.mode == mode && oc.id == id) {
        got = oc.charged_bytes;
        FUZZ_CHECK(!w->limit[o] || oc.limit_bytes == w->limit[o],
                   "owner %d reports limit %#lx, configured %#lx", o, oc.limit_bytes.value_or(0),
                   w->limit[o].value_or(0));
      }
    }
    FUZZ_CHECK(got == want, "%s owner charged %#lx, model %#lx", to_string(mode), got, want);
    if (got > w->last_charge[o]) {
      const uint64_t limit = w->limit[o].value_or(fx->rlimit);
      FUZZ_CHECK(got <= limit, "%s charge grew to %#lx, over the limit %#lx", to_string(mode), got,
                 limit);
    }
    w->last_charge[o] = got;
    total += got;
  }
  FUZZ_CHECK(c.charged_bytes == total, "charged_bytes %#lx != sum over owners %#lx",
             c.charged_bytes, total);
}

void check_placement(const IoasModel& m, uint64_t iova, const std::vector<AreaModel>& added,
                     std::optional<uint64_t> fixed) {
  uint64_t total = 0;
  for (const auto& a : added) total += a.len;
  const auto r = range_of(iova, total);
  FUZZ_CHECK(r.has_value(), "new mapping at %#lx + %#lx wraps", iova, total);
  if (fixed) FUZZ_CHECK(iova == *fixed, "fixed map at %#lx landed at %#lx", *fixed, iova);
  FUZZ_CHECK(m.overlapping(*r).empty(), "new mapping [%#lx, %#lx] overlaps a mapping", r->start,
             r->last);
  FUZZ_CHECK(!any_overlap(m.reserved(), *r), "new mapping [%#lx, %#lx] overlaps a reserved range",
             r->start, r->last);
  FUZZ_CHECK(m.areas.size() + added.size() <= m.max_mappings, "mapping limit %u exceeded",
             m.max_mappings);
  if (!fixed) {
    FUZZ_CHECK(iova != 0, "allocated IOVA 0");
    if (m.allowed.empty()) {
      FUZZ_CHECK(r->start >= kPageSize && r->last <= kMax - kPageSize,
                 "allocated [%#lx, %#lx] outside the default IOVA space", r->start, r->last);
    } else {
      FUZZ_CHECK(std::any_of(m.allowed.begin(), m.allowed.end(),
                             [&](const IovaRange& x) { return x.contains(*r); }),
                 "allocated [%#lx, %#lx] outside the allowed ranges", r->start, r->last);
    }
  }
  const uint64_t align = m.alignment();
  for (const auto& a : added) {
    FUZZ_CHECK(is_aligned(a.iova, align) && is_aligned(a.len, align) &&
                   is_aligned(dma_address(a.src), align),
               "mapping [%#lx, +%#lx] backed at %#lx breaks the alignment %#lx", a.iova, a.len,
               dma_address(a.src), align);
  }
}

int walk(const AreaMap& areas, const IovaRange& r, uint32_t need, bool rw) {
  uint64_t pos = r.start;
  for (const AreaModel* a : overlapping(areas, r)) {
    if (a->iova > pos) return ENOENT;
    if (a->host_invalid) return EBUSY;
    if ((a->prot & need) != need) return EPERM;
    if (rw && a->src.kind() == SourceKind::simulated) return ENXIO;
    if (a->last() >= r.last) return 0;
    pos = a->last() + 1;
  }
  return ENOENT;
}

namespace {

// Host bytes behind [iova, +len) of m, if every page is real memory and no
// page is reached twice (an aliased write would not read back).
struct HostPiece {
  uint8_t* host;
  uint64_t len;
};

std::optional<std::vector<HostPiece>> host_pieces(const AreaMap& areas, uint64_t iova,
                                                  uint64_t len) {
  std::vector<HostPiece> out;
  std::vector<PageRun> runs;
  const IovaRange r{iova, iova + len - 1};
  for (const AreaModel* a : overlapping(areas, r)) {
    if (a->src.kind() == SourceKind::simulated) return std::nullopt;
    const uint64_t s = std::max(a->iova, r.start);
    const uint64_t l = std::min(a->last(), r.last);
    out.push_back({reinterpret_cast<uint8_t*>(dma_address(a->src, s - a->iova)), l - s + 1});
    add_run(runs, a->src, s - a->iova, l - s + 1, 0);
  }
  uint64_t pages = 0;
  for (const auto& x : runs) pages += x.last - x.first + 1;
  if (distinct_pages(runs, [](const PageRun&) { return true; }).first != pages) {
    return std::nullopt;
  }
  return out;
}

}  // namespace

// User memory outside the read-write part (or, for read, the read-only part).
bool source_faults(const MemorySource& src, bool write) {
  if (src.kind() != SourceKind::user) return false;
  const uint64_t user = reinterpret_cast<uint64_t>(fx->user);
  const uint64_t good_last = user + fx->user_rw + (write ? 0 : fx->user_ro) - 1;
  const uint64_t first = dma_address(src);
  return first < user || first + (src.length() - 1) > good_last;
}

namespace {

uint64_t owner_charge(const std::vector<PageRun>& runs, int owner) {
  const auto [real, sim] =
      distinct_pages(runs, [owner](const PageRun& x) { return x.owner == owner; });
  return (real + sim) * kPageSize;
}

}  // namespace

int predict_pins(const std::vector<AreaModel>& areas) {
  std::vector<PageRun> runs = expected_runs();
  for (const AreaModel& a : areas) {
    if (a.owner != kNoOwner) {
      const uint64_t before = owner_charge(runs, a.owner);
      std::vector<PageRun> with = runs;
      add_run(with, a.src, 0, a.len, a.owner);
      const uint64_t after = owner_charge(with, a.owner);
      if (after > before && after > w->limit[a.owner].value_or(fx->rlimit)) return ENOMEM;
    }
    if (source_faults(a.src, (a.prot & kProtWrite) != 0)) return EFAULT;
    add_run(runs, a.src, 0, a.len, a.owner);
  }
  return 0;
}

bool user_memory_faults(const AreaMap& areas, const IovaRange& r, bool write) {
  const uint64_t user = reinterpret_cast<uint64_t>(fx->user);
  const uint64_t good_last = user + fx->user_rw + (write ? 0 : fx->user_ro) - 1;
  for (const AreaModel* a : overlapping(areas, r)) {
    if (a->src.kind() != SourceKind::user) continue;
    const uint64_t s = std::max(a->iova, r.start);
    const uint64_t l = std::min(a->last(), r.last);
    const uint64_t host_first = dma_address(a->src, s - a->iova);
    const uint64_t host_last = host_first + (l - s);
    if (host_first < user || host_last > good_last) return true;
  }
  return false;
}

void check_host_bytes(const AreaMap& areas, uint64_t iova, const uint8_t* buf, uint64_t len,
                      const char* what) {
  auto pieces = host_pieces(areas, iova, len);
  if (!pieces) return;
  uint64_t off = 0;
  for (const HostPiece& p : *pieces) {
    FUZZ_CHECK(std::memcmp(p.host, buf + off, p.len) == 0,
               "%s: memory behind [%#lx, +%#lx) differs from the buffer", what, iova + off, p.len);
    off += p.len;
  }
}

}  // namespace iomm::fuzz::ioas_sequence
