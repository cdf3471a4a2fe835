// Operations on address spaces and domains: map, copy, unmap, attach and
// detach, domain creation, allowed and reserved ranges, limits, live update.
#include "ioas_sequence/generators.hpp"
#include "ioas_sequence/operations.hpp"
#include "ioas_sequence/oracle.hpp"

namespace iomm::fuzz::ioas_sequence {

namespace {

// Builds a source from the input. False if its factory failed (checked).
bool make_source(Reader& in, std::optional<MemorySource>* out) {
  const uint8_t kind = in.u8();
  switch (kind % 6) {
    case 0:
    case 1: {
      const bool rw = kind % 6 == 0;
      const uint64_t off = pick_len(in);
      const uint64_t len = pick_len(in);
      auto s = MemorySource::from_file(rw ? fx->file_rw_fd : fx->file_ro_fd, off, len);
      FUZZ_CHECK_ERRNO(s, "from_file", EBADF, ENODEV, EINVAL, EOVERFLOW, ENOMEM);
      const uint64_t size = rw ? fx->file_rw_size : fx->file_ro_size;
      uint64_t end = 0;
      const bool valid = len != 0 && !__builtin_add_overflow(off, len, &end) && end <= size;
      FUZZ_CHECK(s.ok() == valid, "from_file(%#lx, %#lx) of a %#lx-byte file gave %s", off, len,
                 size, errno_name(s.code()));
      if (!s) return false;
      FUZZ_CHECK(s->writable() == rw && s->kind() == SourceKind::file, "file source properties");
      *out = *s;
      return true;
    }
    case 2: {
      const MemorySource& base = *fx->sim[kind & 1];
      const uint64_t off = pick_len(in) % fx->sim_size;
      uint64_t len = pick_len(in);
      if (len == 0 || len > fx->sim_size - off) {
        if (len == 0 || len > (1ULL << 47)) {
          auto s = MemorySource::simulated(len);  // invalid: fails without using a serial
          FUZZ_CHECK(s.code() == EINVAL, "simulated(%#lx) gave %s", len, errno_name(s.code()));
          return false;
        }
        len = fx->sim_size - off;
      }
      *out = base.slice(off, len);
      return true;
    }
    default: {
      // User memory: read-write, read-only or PROT_NONE parts of one region.
      const uint64_t total = fx->user_total();
      uint64_t off = 0;
      if (kind % 6 == 5) {
        off = fx->user_rw + fx->user_ro + (in.u8() % 2 == 0 ? 0 : kPageSize) - kPageSize;
      } else {
        off = pick_len(in) % (fx->user_rw + fx->user_ro);
      }
      if ((kind & 0x80) != 0 && kind % 6 == 5) {
        auto s = MemorySource::from_user(reinterpret_cast<void*>(kMax - 0x10), 0x100);
        FUZZ_CHECK(s.code() == EOVERFLOW, "from_user wrapping gave %s", errno_name(s.code()));
        return false;
      }
      uint64_t len = pick_len(in);
      if (len == 0) {
        auto s = MemorySource::from_user(fx->user + off, 0);
        FUZZ_CHECK(s.code() == EINVAL, "from_user(len 0) gave %s", errno_name(s.code()));
        return false;
      }
      len = std::min(len, total - off);
      const bool writable = kind % 6 != 4;
      auto s = MemorySource::from_user(fx->user + off, len, writable);
      FUZZ_CHECK(s.ok(), "from_user failed: %s", s.error().describe().c_str());
      *out = *s;
      return true;
    }
  }
}

IoasModel* ioas_slot(Reader& in) { return w->ioas[in.u8() & 1].get(); }

}  // namespace

int predict_map_errno(const IoasModel& m, const MemorySource& src, uint32_t prot,
                      std::optional<uint64_t> fixed) {
  if ((fixed && *fixed == kMax) || src.length() == kMax) return EOVERFLOW;
  if ((prot & ~3U) != 0 || (prot & 3U) == 0) return EINVAL;
  if ((prot & kProtWrite) != 0 && !src.writable()) return EPERM;
  const uint64_t align = m.alignment();
  if (!is_aligned(src.length(), align) || !is_aligned(dma_address(src), align)) return EINVAL;
  if (!fixed) return -1;
  if (!is_aligned(*fixed, align)) return EINVAL;
  const auto range = range_of(*fixed, src.length());
  if (!range) return EOVERFLOW;
  if (any_overlap(m.reserved(), *range)) return EINVAL;
  if (!m.overlapping(*range).empty()) return EEXIST;
  if (m.areas.size() + 1 > m.max_mappings) return ENOSPC;
  if (m.domains.empty()) return 0;
  return predict_pins({{*fixed, src.length(), prot, src, m.owner()}});
}

namespace {

// The same for copy_from into dst of the slices the model cut from the
// source range: arguments, the source walk (a read-only page before any
// hole is EPERM for a writable copy, a hole ENOENT), then placement as map.
int predict_copy_errno(const IoasModel& dst, uint64_t src_iova, uint64_t len, uint32_t prot,
                       std::optional<uint64_t> fixed, const std::vector<AreaModel>& slices,
                       bool covered, bool read_only) {
  if (len == kMax || src_iova == kMax || (fixed && *fixed == kMax)) return EOVERFLOW;
  if ((prot & ~3U) != 0 || (prot & 3U) == 0) return EINVAL;
  if (len == 0) return EINVAL;
  if (!range_of(src_iova, len)) return EOVERFLOW;
  if ((prot & kProtWrite) != 0 && read_only) return EPERM;
  if (!covered) return ENOENT;
  const uint64_t align = dst.alignment();
  for (const AreaModel& s : slices) {
    if (!is_aligned(s.len, align) || !is_aligned(dma_address(s.src), align)) return EINVAL;
  }
  if (!fixed) return -1;
  if (!is_aligned(*fixed, align)) return EINVAL;
  const auto range = range_of(*fixed, len);
  if (!range) return EOVERFLOW;
  if (any_overlap(dst.reserved(), *range)) return EINVAL;
  if (!dst.overlapping(*range).empty()) return EEXIST;
  if (dst.areas.size() + slices.size() > dst.max_mappings) return ENOSPC;
  return dst.domains.empty() ? 0 : predict_pins(slices);
}

}  // namespace

void op_map(Reader& in) {
  IoasModel* m = ioas_slot(in);
  std::optional<MemorySource> src;
  if (!make_source(in, &src)) return;
  const uint8_t pb = in.u8();
  const uint32_t prot = pick_prot(pb);
  std::optional<uint64_t> fixed;
  if ((pb & 4) != 0) fixed = pick_iova_rel(in, m);
  w->probe_iova = fixed.value_or(0);
  const int want = predict_map_errno(*m, *src, prot, fixed);
  const auto& r = note(m->ioas->map(*src, prot, fixed));
  FUZZ_CHECK_ERRNO(r, "map", EOVERFLOW, EINVAL, EEXIST, ENOSPC, EPERM, EFAULT, ENOMEM);
  if (want >= 0) {
    FUZZ_CHECK(r.code() == want, "map of [%#lx, +%#lx) prot %u gave %s, model %s",
               fixed.value_or(0), src->length(), prot, errno_name(r.code()), errno_name(want));
  }
  if (want < 0 && (r.ok() || r.code() == EFAULT || r.code() == ENOMEM)) {
    // An allocated IOVA: where the allocation did not fail (ENOSPC, EOVERFLOW),
    // the pin decides.
    const int pin =
        m->domains.empty() ? 0 : predict_pins({{0, src->length(), prot, *src, m->owner()}});
    FUZZ_CHECK(r.code() == pin, "map (allocated IOVA) of %#lx bytes prot %u gave %s, model %s",
               src->length(), prot, errno_name(r.code()), errno_name(pin));
  }
  if (!r) return;
  FUZZ_CHECK(prot == kProtRead || prot == kProtWrite || prot == (kProtRead | kProtWrite),
             "map with prot %#x succeeded", prot);
  FUZZ_CHECK((prot & kProtWrite) == 0 || src->writable(), "write map of a read-only source");
  std::vector<AreaModel> added{{*r, src->length(), prot, *src, m->owner()}};
  check_placement(*m, *r, added, fixed);
  m->areas.emplace(*r, added[0]);
  w->probe_iova = *r;
}

void op_copy(Reader& in) {
  IoasModel* dst = ioas_slot(in);
  IoasModel* src = ioas_slot(in);
  const uint64_t src_iova = pick_iova_rel(in, src);
  const uint64_t len = pick_len_rel(in, src, src_iova);
  const uint8_t pb = in.u8();
  const uint32_t prot = pick_prot(pb);
  std::optional<uint64_t> fixed;
  if ((pb & 4) != 0) fixed = pick_iova_rel(in, dst);
  // The slices the copy must create (before the call: dst may be src).
  std::vector<AreaModel> slices;
  bool covered = false;
  bool read_only = false;
  if (auto r = range_of(src_iova, len)) {
    uint64_t pos = r->start;
    for (const AreaModel* a : src->overlapping(*r)) {
      if (a->iova > pos) break;
      if (!a->src.writable()) read_only = true;
      const uint64_t last = std::min(a->last(), r->last);
      slices.push_back(
          {0, last - pos + 1, prot, a->src.slice(pos - a->iova, last - pos + 1), a->owner});
      if (last == r->last) {
        covered = true;
        break;
      }
      pos = last + 1;
    }
  }
  const int want = predict_copy_errno(*dst, src_iova, len, prot, fixed, slices, covered, read_only);
  const auto& r = note(dst->ioas->copy_from(*src->ioas, src_iova, len, prot, fixed));
  FUZZ_CHECK_ERRNO(r, "copy_from", EOVERFLOW, EINVAL, EEXIST, ENOSPC, EPERM, ENOENT, EFAULT,
                   ENOMEM);
  if (want >= 0) {
    FUZZ_CHECK(r.code() == want, "copy_from(%#lx, %#lx) prot %u gave %s, model %s", src_iova, len,
               prot, errno_name(r.code()), errno_name(want));
  }
  if (want < 0 && (r.ok() || r.code() == EFAULT || r.code() == ENOMEM)) {
    const int pin = dst->domains.empty() ? 0 : predict_pins(slices);
    FUZZ_CHECK(r.code() == pin, "copy_from (allocated IOVA) of %#lx bytes gave %s, model %s", len,
               errno_name(r.code()), errno_name(pin));
  }
  if (!r) return;
  FUZZ_CHECK(covered, "copy of [%#lx, +%#lx), not fully mapped, succeeded", src_iova, len);
  FUZZ_CHECK(!((prot & kProtWrite) != 0 && read_only), "writable copy of read-only pages");
  FUZZ_CHECK(prot == kProtRead || prot == kProtWrite || prot == (kProtRead | kProtWrite),
             "copy with prot %#x succeeded", prot);
  uint64_t iova = *r;
  for (auto& s : slices) {
    s.iova = iova;
    iova += s.len;
  }
  check_placement(*dst, *r, slices, fixed);
  for (const auto& s : slices) dst->areas.emplace(s.iova, s);
  w->probe_iova = *r;
}

void unmap_model(IoasModel& m, const IovaRange& r) {
  for (AccessModel* acc : w->accesses_of(&m)) {
    for (const auto& [iova, len] : acc->pins) {
      FUZZ_CHECK(!(IovaRange{iova, iova + len - 1}.overlaps(r)),
                 "access pin [%#lx, +%#lx) survived an unmap of [%#lx, %#lx]", iova, len, r.start,
                 r.last);
    }
    for (const auto& [page, count] : acc->page_pins) {
      FUZZ_CHECK(!page_range(page).overlaps(r),
                 "page pin at %#lx survived an unmap of [%#lx, %#lx]", page, r.start, r.last);
    }
  }
  // The log is cleared over the pages of the span of the removed mappings,
  // from the first one's first page to the last one's last page.
  std::optional<uint64_t> first, last;
  for (const auto& [start, a] : m.areas) {
    if (!r.contains(a.range())) continue;
    if (!first) first = a.iova >> kPageShift;
    last = a.last() >> kPageShift;
  }
  if (first) {
    m.dirty_pages.erase(m.dirty_pages.lower_bound(*first), m.dirty_pages.upper_bound(*last));
  }
  std::erase_if(m.areas, [&](const auto& e) { return r.contains(e.second.range()); });
}

void op_unmap(Reader& in) {
  IoasModel* m = ioas_slot(in);
  const uint8_t how = in.u8() % 3;
  const uint64_t iova = pick_iova_rel(in, m);
  const uint64_t len = pick_len_rel(in, m, iova);
  w->probe_iova = iova;
  if (how == 2) {
    uint64_t want = 0;
    for (const auto& [s, a] : m->areas) want += a.len;
    g_unmap_request = IovaRange{0, kMax};
    const auto& r = note(m->ioas->unmap_all());
    g_unmap_request.reset();
    FUZZ_CHECK(r.ok() && *r == want, "unmap_all gave %s / %#lx, model %#lx", errno_name(r.code()),
               r.ok() ? *r : 0, want);
    unmap_model(*m, {0, kMax});
    return;
  }
  // The model's verdict, in the order of the contract.
  int want_err = 0;
  uint64_t want_bytes = 0;
  const auto range = range_of(iova, len);
  if (iova == kMax || len == kMax) {
    want_err = EOVERFLOW;
  } else if (len == 0) {
    want_err = EINVAL;
  } else if (!range) {
    want_err = EOVERFLOW;
  } else {
    for (const AreaModel* a : m->overlapping(*range)) {
      if (!range->contains(a->range())) want_err = ENOENT;
      want_bytes += a->len;
    }
    if (want_err == 0 && want_bytes == 0 && how == 0) want_err = ENOENT;
  }
  if (range) g_unmap_request = *range;
  const auto& r =
      note(how == 0 ? m->ioas->unmap(iova, len) : m->ioas->unmap_range_allow_empty(iova, len));
  g_unmap_request.reset();
  FUZZ_CHECK(r.code() == want_err && (!r.ok() || *r == want_bytes),
             "%s(%#lx, %#lx) gave %s / %#lx, model %s / %#lx",
             how == 0 ? "unmap" : "unmap_range_allow_empty", iova, len, errno_name(r.code()),
             r.ok() ? *r : 0, errno_name(want_err), want_bytes);
  if (r.ok()) unmap_model(*m, *range);
}

void op_attach(Reader& in, bool attach) {
  IoasModel* m = ioas_slot(in);
  const std::shared_ptr<DomainModel> d = w->domain[in.u8() & 1];
  const std::shared_ptr<SoftDomain> sd = d ? d->domain : nullptr;
  if (!attach) {
    const bool here = d && d->attached == m;
    const Status& s = note(m->ioas->detach(sd));
    FUZZ_CHECK(s.code() == (here ? 0 : ENOENT), "detach gave %s, model %s", errno_name(s.code()),
               here ? "success" : "ENOENT");
    if (s) {
      std::erase(m->domains, d);
      d->attached = nullptr;
    }
    return;
  }
  const Status& s = note(m->ioas->attach(sd));
  FUZZ_CHECK_ERRNO(s, "attach", EBUSY, EINVAL, EADDRINUSE, EFAULT, ENOMEM);
  if (!d) {
    FUZZ_CHECK(s.code() == EINVAL, "attach(nullptr) gave %s", errno_name(s.code()));
    return;
  }
  if (d->attached != nullptr) {
    const int want = d->attached == m ? EINVAL : EBUSY;
    FUZZ_CHECK(s.code() == want, "attach of an attached domain gave %s, model %s",
               errno_name(s.code()), errno_name(want));
    return;
  }
  // EADDRINUSE exactly when a mapping or allowed range conflicts.
  const std::vector<IovaRange> res = d->reservations();
  bool conflict = false;
  for (const IovaRange& r : res) {
    conflict = conflict || !m->overlapping(r).empty() || any_overlap(m->allowed, r);
  }
  const uint64_t align = std::max(m->alignment(), d->cfg.min_page_size);
  for (const auto& [st, a] : m->areas) {
    conflict = conflict || !is_aligned(a.iova, align) || !is_aligned(a.len, align) ||
               !is_aligned(dma_address(a.src), align);
  }
  if (conflict) {
    FUZZ_CHECK(s.code() == EADDRINUSE, "conflicting attach gave %s", errno_name(s.code()));
    return;
  }
  // The first domain pins every mapping, in IOVA order; later ones pin nothing.
  int want = 0;
  if (m->domains.empty()) {
    std::vector<AreaModel> areas;
    for (const auto& [start, a] : m->areas) areas.push_back(a);
    want = predict_pins(areas);
  }
  FUZZ_CHECK(s.code() == want, "attach without conflict gave %s, model %s: %s",
             errno_name(s.code()), errno_name(want), s.ok() ? "" : s.error().message().c_str());
  if (!s) return;
  m->domains.push_back(d);
  d->attached = m;
}

void op_domain_create(Reader& in) {
  const uint8_t slot = in.u8() & 1;
  const uint8_t a = in.u8();
  const uint8_t b = in.u8();
  DomainConfig cfg;
  bool valid = true;
  switch (a % 5) {
    case 1:
      cfg.aperture_start = 0;
      cfg.aperture_last = kMax;
      break;
    case 2:
      cfg.aperture_start = 0x100000;
      cfg.aperture_last = 0x1ffffff;
      break;
    case 3:
      cfg.aperture_start = 0x1000;
      cfg.aperture_last = (1ULL << 39) - 1;
      break;
    case 4:
      cfg.aperture_start = 0x200000;
      cfg.aperture_last = 0x1fffff;
      valid = false;
      break;
    default:
      break;
  }
  const uint64_t min_pages[] = {kPageSize, kPageSize, 0x10000, kPageSize2M, 0x1800, 0x800};
  cfg.min_page_size = min_pages[(a / 5) % 6];
  valid =
      valid && cfg.min_page_size >= kPageSize && (cfg.min_page_size & (cfg.min_page_size - 1)) == 0;
  const uint64_t sizes[] = {kPageSize | kPageSize2M | kPageSize1G, kPageSize,
                            kPageSize | kPageSize2M, kPageSize2M, kPageSize | 0x8000};
  cfg.page_sizes = sizes[b % 5];
  valid = valid && (b % 5) < 3;
  switch ((b / 5) % 5) {
    case 1:
      cfg.reserved = {{0xfee00000, 0xfeefffff}};
      break;
    case 2:
      cfg.reserved = {{0, 0xfff}};
      break;
    case 3:
      cfg.reserved = {{0x200000, 0x3fffff}, {0x10000, 0x10fff}};
      break;
    case 4:
      cfg.reserved = {{5, 4}};
      valid = false;
      break;
    default:
      break;
  }
  const size_t caps[] = {256, 0, 2};
  cfg.fault_log_capacity = caps[(b / 25) % 3];
  const auto& d = note(SoftDomain::create(cfg));
  FUZZ_CHECK_ERRNO(d, "SoftDomain::create", EINVAL, ENOMEM);
  FUZZ_CHECK(valid ? (d.ok() || d.code() == ENOMEM) : d.code() == EINVAL,
             "SoftDomain::create of a %s config gave %s", valid ? "valid" : "invalid",
             errno_name(d.code()));
  if (!d) return;
  auto model = std::make_shared<DomainModel>();
  model->domain = *d;
  model->cfg = cfg;
  w->domain[slot] = model;  // an attached domain lives on in its IOAS
}

namespace {

IovaRange pick_range(Reader& in, const IoasModel* m) {
  const uint64_t start = pick_iova_rel(in, m);
  const uint64_t len = pick_len(in);
  return {start, start + len - 1};  // may wrap: start > last
}

}  // namespace

void op_set_allowed(Reader& in) {
  IoasModel* m = ioas_slot(in);
  const size_t n = in.u8() % 4;
  std::vector<IovaRange> ranges;
  for (size_t i = 0; i < n; ++i) ranges.push_back(pick_range(in, m));
  std::vector<IovaRange> sorted = ranges;
  std::sort(sorted.begin(), sorted.end(),
            [](const IovaRange& a, const IovaRange& b) { return a.start < b.start; });
  int want = 0;
  for (size_t i = 0; i < sorted.size(); ++i) {
    if (sorted[i].start > sorted[i].last || (i > 0 && sorted[i - 1].last >= sorted[i].start)) {
      want = EINVAL;
    }
  }
  if (want == 0) {
    const auto res = m->reserved();
    for (const IovaRange& r : sorted) {
      if (any_overlap(res, r)) want = EADDRINUSE;
    }
  }
  const Status& s = note(m->ioas->set_allowed_ranges(ranges));
  FUZZ_CHECK(s.code() == want || (want == 0 && s.code() == ENOMEM),
             "set_allowed_ranges gave %s, model %s", errno_name(s.code()), errno_name(want));
  if (s) m->allowed = sorted;
}

void op_reserved(Reader& in) {
  IoasModel* m = ioas_slot(in);
  const uint8_t b = in.u8();
  if ((b & 1) == 0) {
    const IovaRange r = pick_range(in, m);
    int want = 0;
    if (r.start > r.last) {
      want = EINVAL;
    } else if (!m->overlapping(r).empty() || any_overlap(m->allowed, r)) {
      want = EADDRINUSE;
    }
    const Status& s = note(m->ioas->add_reserved(r));
    FUZZ_CHECK(s.code() == want || (want == 0 && s.code() == ENOMEM),
               "add_reserved([%#lx, %#lx]) gave %s, model %s", r.start, r.last,
               errno_name(s.code()), errno_name(want));
    if (s) m->user_reserved.push_back(r);
    return;
  }
  IovaRange r;
  if ((b & 2) != 0 && !m->user_reserved.empty()) {
    r = m->user_reserved[in.u8() % m->user_reserved.size()];
  } else {
    r = pick_range(in, m);
  }
  auto it = std::find(m->user_reserved.begin(), m->user_reserved.end(), r);
  const Status& s = note(m->ioas->remove_reserved(r));
  const int want = it == m->user_reserved.end() ? ENOENT : 0;
  FUZZ_CHECK(s.code() == want, "remove_reserved gave %s, model %s", errno_name(s.code()),
             errno_name(want));
  if (s) m->user_reserved.erase(it);
}

std::shared_ptr<IoasModel> create_ioas(uint8_t b) {
  auto m = std::make_shared<IoasModel>();
  const AccountMode modes[] = {AccountMode::per_process, AccountMode::per_user, AccountMode::none};
  m->mode = modes[b % 3];
  const uint32_t maxes[] = {kDefaultMaxMappings, 1, 2, 4};
  m->max_mappings = maxes[(b / 3) % 4];
  IoasOptions o;
  o.account_mode = m->mode;
  o.max_mappings = m->max_mappings;
  if ((b / 12) % 8 == 7) {
    IoasOptions bad = o;
    bad.max_mappings = 0;
    auto r = Ioas::create(bad);
    FUZZ_CHECK(r.code() == EINVAL, "Ioas::create(max_mappings 0) gave %s", errno_name(r.code()));
  }
  auto r = Ioas::create(o);
  FUZZ_CHECK(r.ok(), "Ioas::create failed: %s", r.ok() ? "" : r.error().describe().c_str());
  m->ioas = *r;
  return m;
}

void op_recreate_ioas(Reader& in) {
  const uint8_t slot = in.u8() & 1;
  const uint8_t b = in.u8();
  w->ioas[slot].reset();  // lives on while an access uses it
  w->ioas[slot] = create_ioas(b);
}

void op_set_limit(Reader& in) {
  const uint8_t b = in.u8();
  const std::optional<uint64_t> limit = kLimits[in.u8() % std::size(kLimits)];
  const int which = b % 4;
  if (which >= 2) {
    // Invalid: mode none, or a negative id.
    Status s = which == 2 ? set_memlock_limit(AccountMode::none, 0, limit)
                          : set_memlock_limit(AccountMode::per_process, -1, limit);
    FUZZ_CHECK(s.code() == EINVAL, "invalid set_memlock_limit gave %s", errno_name(s.code()));
    return;
  }
  const AccountMode mode =
      which == kProcessOwner ? AccountMode::per_process : AccountMode::per_user;
  const int id =
      (b & 4) == 0 ? 0 : (which == kProcessOwner ? getpid() : static_cast<int>(getuid()));
  Status s = set_memlock_limit(mode, id, limit);
  FUZZ_CHECK(s.ok(), "set_memlock_limit failed: %s", s.ok() ? "" : s.error().describe().c_str());
  w->limit[which] = limit;
  // Lowering a limit below the current charge is allowed; only growth is bound.
}

namespace {

void invalidate_host(IoasModel& m, Reader& in) {
  const uint64_t iova = pick_iova_rel(in, &m);
  const uint64_t len = pick_len_rel(in, &m, iova);
  w->probe_iova = iova;
  const auto range = range_of(iova, len);
  int want = 0;
  uint64_t want_bytes = 0;
  if (len == 0) {
    want = EINVAL;
  } else if (!range) {
    want = EOVERFLOW;
  } else {
    // In IOVA order, the first mapping that is cut or already invalid decides.
    for (const AreaModel* a : m.overlapping(*range)) {
      if (!range->contains(a->range())) {
        want = ENOENT;
      } else if (a->host_invalid) {
        want = EINVAL;
      }
      if (want != 0) break;
      want_bytes += a->len;
    }
  }
  const auto& r = note(m.ioas->invalidate_host(iova, len));
  FUZZ_CHECK(r.code() == want && (!r.ok() || *r == want_bytes),
             "invalidate_host(%#lx, %#lx) gave %s / %#lx, model %s / %#lx", iova, len,
             errno_name(r.code()), r.ok() ? *r : 0, errno_name(want), want_bytes);
  if (!r) return;
  for (auto& [start, a] : m.areas) {
    if (range->contains(a.range())) a.host_invalid = true;
  }
}

void replace_host(IoasModel& m, uint8_t how, Reader& in) {
  const uint64_t iova = pick_iova_rel(in, &m);
  w->probe_iova = iova;
  auto it = m.areas.find(iova);
  // The new source: the mapping's own (same pages), a same-length slice of
  // the read-write memfd, or any source from the input.
  std::optional<MemorySource> src;
  switch (how % 3) {
    case 0:
      if (it != m.areas.end()) src = it->second.src;
      break;
    case 1: {
      const uint64_t off = pick_len(in) & ~(kPageSize - 1);
      if (it != m.areas.end() && it->second.len <= fx->file_rw_size) {
        const uint64_t len = it->second.len;
        auto s =
            MemorySource::from_file(fx->file_rw_fd, off <= fx->file_rw_size - len ? off : 0, len);
        FUZZ_CHECK(s.ok(), "from_file of a fitting slice failed");
        src = *s;
      }
      break;
    }
    default:
      if (!make_source(in, &src)) return;
      break;
  }
  if (!src) src = fx->file_rw_whole->slice(0, kPageSize);
  int want = 0;
  if (it == m.areas.end()) {
    want = ENOENT;
  } else {
    const AreaModel& a = it->second;
    bool access_pins = false;
    for (AccessModel* acc : w->accesses_of(&m)) {
      for (const auto& [piova, plen] : acc->pins) {
        access_pins = access_pins || IovaRange{piova, piova + plen - 1}.overlaps(a.range());
      }
      for (const auto& [page, count] : acc->page_pins) {
        access_pins = access_pins || page_range(page).overlaps(a.range());
      }
    }
    // The new backing must fit the alignment, as for map().
    if (!a.host_invalid || a.len != src->length() ||
        !is_aligned(dma_address(*src), m.alignment())) {
      want = EINVAL;
    } else if (access_pins) {
      want = EBUSY;
    } else if ((a.prot & kProtWrite) != 0 && !src->writable()) {
      want = EPERM;
    } else {
      // The new source is pinned and charged while the old one still is.
      if (!m.domains.empty()) want = predict_pins({{a.iova, a.len, a.prot, *src, m.owner()}});
    }
  }
  const Status& s = note(m.ioas->replace_host(iova, *src, OwnerSpec{}));
  FUZZ_CHECK(s.code() == want, "replace_host(%#lx) gave %s, model %s: %s", iova,
             errno_name(s.code()), errno_name(want), s.ok() ? "" : s.error().message().c_str());
  if (!s) return;
  AreaModel& a = it->second;
  a.src = *src;
  a.owner = m.owner();
  a.host_invalid = false;
}

}  // namespace

// Live update: invalidate_host over a range, or replace_host of one mapping.
void op_live(Reader& in) {
  IoasModel* m = ioas_slot(in);
  const uint8_t b = in.u8();
  if ((b & 1) == 0) return invalidate_host(*m, in);
  replace_host(*m, static_cast<uint8_t>(b >> 1), in);
}

}  // namespace iomm::fuzz::ioas_sequence
