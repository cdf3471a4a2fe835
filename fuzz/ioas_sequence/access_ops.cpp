// Operations of accesses and devices: access creation, pin, unpin, read and
// write, device DMA, translate and the fault log.
#include "ioas_sequence/generators.hpp"
#include "ioas_sequence/operations.hpp"
#include "ioas_sequence/oracle.hpp"

namespace iomm::fuzz::ioas_sequence {

void op_access_create(Reader& in) {
  const uint8_t slot = in.u8() & 1;
  const std::shared_ptr<IoasModel> io = w->ioas[in.u8() & 1];
  const uint8_t behaviour = in.u8();
  w->access[slot].reset();  // destroy the old one first (unpins it)
  auto model = std::make_unique<AccessModel>();
  model->refuse_alternate = (behaviour & 1) != 0;
  model->probe_in_callback = (behaviour & 2) != 0;
  AccessModel* raw = model.get();
  const auto& a = note(Access::create(io->ioas, [raw](const IovaRange& r) { raw->on_unmap(r); }));
  FUZZ_CHECK_ERRNO(a, "Access::create", EINVAL, EADDRINUSE, ENOMEM);
  bool aligned = true;
  for (const auto& [s, area] : io->areas) {
    aligned = aligned && is_aligned(area.iova, kPageSize) && is_aligned(area.len, kPageSize) &&
              is_aligned(dma_address(area.src), kPageSize);
  }
  FUZZ_CHECK(aligned ? (a.ok() || a.code() == ENOMEM) : a.code() == EADDRINUSE,
             "Access::create over %s mappings gave %s", aligned ? "aligned" : "unaligned",
             errno_name(a.code()));
  if (!a) return;
  {
    std::lock_guard lk(model->mu);
    model->access = *a;
  }
  model->io = io;
  ++io->accesses;
  w->access[slot] = std::move(model);
}

void op_pin(Reader& in) {
  AccessModel* acc = w->access[in.u8() & 1].get();
  if (acc == nullptr) return;
  const IoasModel& m = *acc->io;
  const uint64_t iova = pick_iova_rel(in, &m);
  const uint64_t len = pick_len_rel(in, &m, iova);
  const uint32_t prot = pick_prot(in.u8());
  w->probe_iova = iova;
  int want = 0;
  const auto range = range_of(iova, len);
  if (len == 0) {
    want = EINVAL;
  } else if (!range) {
    want = EOVERFLOW;
  } else if (!is_aligned(iova, kPageSize) || !is_aligned(len, kPageSize)) {
    want = EINVAL;
  } else if (prot == 0 || (prot & ~3U) != 0) {
    want = EINVAL;
  } else {
    want = walk(m, *range, prot, false);
  }
  std::lock_guard lk(acc->mu);
  const auto& r = note(acc->access->pin(iova, len, prot));
  if (want != 0) {
    FUZZ_CHECK(r.code() == want, "pin(%#lx, %#lx, %u) gave %s, model %s", iova, len, prot,
               errno_name(r.code()), errno_name(want));
    return;
  }
  FUZZ_CHECK(r.ok() || r.code() == EFAULT || r.code() == ENOMEM,
             "pin(%#lx, %#lx, %u) of a mapped range gave %s", iova, len, prot,
             errno_name(r.code()));
  if (!r) return;
  const auto areas = m.overlapping(*range);
  FUZZ_CHECK(r->size() == areas.size(), "pin returned %zu segments for %zu mappings", r->size(),
             areas.size());
  for (size_t i = 0; i < areas.size(); ++i) {
    const AreaModel& a = *areas[i];
    const PinnedSegment& seg = (*r)[i];
    const uint64_t s = std::max(a.iova, range->start);
    const uint64_t l = std::min(a.last(), range->last);
    void* host = a.src.kind() == SourceKind::simulated
                     ? nullptr
                     : reinterpret_cast<void*>(dma_address(a.src, s - a.iova));
    FUZZ_CHECK(seg.iova == s && seg.length == l - s + 1 && seg.host == host,
               "pin segment %zu = {%#lx, %#lx, %p}, model {%#lx, %#lx, %p}", i, seg.iova,
               seg.length, seg.host, s, l - s + 1, host);
  }
  acc->pins.emplace_back(iova, len);
}

void op_unpin(Reader& in) {
  AccessModel* acc = w->access[in.u8() & 1].get();
  if (acc == nullptr) return;
  const uint8_t b = in.u8();
  std::lock_guard lk(acc->mu);
  uint64_t iova = 0;
  uint64_t len = 0;
  if (b < 0x80 && !acc->pins.empty()) {
    std::tie(iova, len) = acc->pins[b % acc->pins.size()];
  } else {
    iova = pick_iova_rel(in, acc->io.get());
    len = pick_len(in);
  }
  auto it = std::find(acc->pins.begin(), acc->pins.end(), std::make_pair(iova, len));
  int want = 0;
  if (len == 0) {
    want = EINVAL;
  } else if (!range_of(iova, len)) {
    want = EOVERFLOW;
  } else if (it == acc->pins.end()) {
    want = EINVAL;
  }
  const Status& s = note(acc->access->unpin(iova, len));
  FUZZ_CHECK(s.code() == want, "unpin(%#lx, %#lx) gave %s, model %s", iova, len,
             errno_name(s.code()), errno_name(want));
  if (s) acc->pins.erase(it);
}

namespace {

constexpr uint64_t kTooManyPages = (kMax >> kPageShift) + 1;  // npages << 12 overflows

// A page count: mostly small, sometimes one whose byte length overflows.
uint64_t pick_npages(uint8_t b) { return b == 0xff ? kTooManyPages : b % 24; }

// pin_pages' verdict on the pages of [iova, iova + npages pages), in its
// order: page by page, the first page not mapped (ENOENT), whose mapping
// has an invalid host address (EBUSY), lacks prot (EPERM) or is simulated
// (ENXIO).
int page_walk(const IoasModel& m, uint64_t iova, uint64_t npages, uint32_t prot) {
  for (uint64_t i = 0; i < npages; ++i) {
    const AreaModel* a = m.find(iova + i * kPageSize);
    if (a == nullptr) return ENOENT;
    if (a->host_invalid) return EBUSY;
    if ((a->prot & prot) != prot) return EPERM;
    if (a->src.kind() == SourceKind::simulated) return ENXIO;
  }
  return 0;
}

}  // namespace

void op_pin_pages(Reader& in) {
  AccessModel* acc = w->access[in.u8() & 1].get();
  if (acc == nullptr) return;
  const IoasModel& m = *acc->io;
  const uint8_t b = in.u8();
  uint64_t iova = pick_iova_rel(in, &m);
  if ((b & 1) != 0) iova &= ~(kPageSize - 1);
  const uint64_t npages = pick_npages(in.u8());
  const uint32_t prot = pick_prot(in.u8());
  const bool null_host = (b & 6) == 6;
  w->probe_iova = iova;
  int want = 0;
  if (npages == 0 || null_host || !is_aligned(iova, kPageSize) || prot == 0 || (prot & ~3U) != 0) {
    want = EINVAL;
  } else if (npages == kTooManyPages || !range_of(iova, npages * kPageSize)) {
    want = EOVERFLOW;
  } else {
    want = page_walk(m, iova, npages, prot);
  }
  std::vector<void*> host(npages < kTooManyPages ? std::max<uint64_t>(npages, 1) : 1,
                          reinterpret_cast<void*>(0x1));
  std::lock_guard lk(acc->mu);
  const Status& s =
      note(acc->access->pin_pages(iova, npages, prot, null_host ? nullptr : host.data()));
  if (want != 0) {
    FUZZ_CHECK(s.code() == want, "pin_pages(%#lx, %lu, %u) gave %s, model %s", iova, npages, prot,
               errno_name(s.code()), errno_name(want));
    return;
  }
  // Pages already held only gain a count: no new pin, so no pinning error.
  uint64_t fresh = 0;
  for (uint64_t i = 0; i < npages; ++i) fresh += acc->page_pins.count(iova + i * kPageSize) == 0;
  FUZZ_CHECK(s.ok() || (fresh > 0 && (s.code() == EFAULT || s.code() == ENOMEM)),
             "pin_pages(%#lx, %lu, %u) of mapped pages (%lu not yet pinned) gave %s", iova, npages,
             prot, fresh, errno_name(s.code()));
  if (!s) return;
  for (uint64_t i = 0; i < npages; ++i) {
    const uint64_t at = iova + i * kPageSize;
    const AreaModel& a = *m.find(at);
    void* expect = reinterpret_cast<void*>(dma_address(a.src, at - a.iova));
    FUZZ_CHECK(host[i] == expect, "pin_pages host[%lu] = %p, model %p", i, host[i], expect);
    ++acc->page_pins[at];
  }
}

void op_unpin_pages(Reader& in) {
  AccessModel* acc = w->access[in.u8() & 1].get();
  if (acc == nullptr) return;
  const uint8_t b = in.u8();
  std::lock_guard lk(acc->mu);
  uint64_t iova = 0;
  uint64_t npages = 0;
  if (b < 0x80 && !acc->page_pins.empty()) {
    // From a held page, a run that may go on past the held ones.
    iova = std::next(acc->page_pins.begin(), static_cast<long>(b % acc->page_pins.size()))->first;
    npages = 1 + in.u8() % 4;
  } else {
    iova = pick_iova_rel(in, acc->io.get());
    if ((b & 1) != 0) iova &= ~(kPageSize - 1);
    npages = pick_npages(in.u8());
  }
  int want = 0;
  if (npages == 0 || !is_aligned(iova, kPageSize)) {
    want = EINVAL;
  } else if (npages == kTooManyPages || !range_of(iova, npages * kPageSize)) {
    want = EOVERFLOW;
  } else {
    for (uint64_t i = 0; i < npages && want == 0; ++i) {
      if (acc->page_pins.count(iova + i * kPageSize) == 0) want = EINVAL;  // not pinned
    }
  }
  const Status& s = note(acc->access->unpin_pages(iova, npages));
  FUZZ_CHECK(s.code() == want, "unpin_pages(%#lx, %lu) gave %s, model %s", iova, npages,
             errno_name(s.code()), errno_name(want));
  if (!s) return;
  for (uint64_t i = 0; i < npages; ++i) {
    auto it = acc->page_pins.find(iova + i * kPageSize);
    if (--it->second == 0) acc->page_pins.erase(it);
  }
}

namespace {

std::vector<uint8_t>& scratch() {
  static auto* buf = new std::vector<uint8_t>(kRwMax);
  return *buf;
}

void fill_pattern(uint8_t* p, size_t n, uint8_t seed) {
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(seed + i * 7);
}

}  // namespace

void op_access_rw(Reader& in) {
  AccessModel* acc = w->access[in.u8() & 1].get();
  if (acc == nullptr) return;
  const IoasModel& m = *acc->io;
  const uint8_t mode = in.u8();
  const bool write = (mode & 1) != 0;
  const uint64_t iova = pick_iova_rel(in, &m);
  uint64_t len = pick_len_rel(in, &m, iova);
  if (len > kRwMax) len = len % (kRwMax + 1);
  w->probe_iova = iova;
  int want = 0;
  const auto range = range_of(iova, len);
  if (len == 0) {
    want = 0;
  } else if (!range) {
    want = EOVERFLOW;
  } else {
    want = walk(m, *range, write ? kProtWrite : kProtRead, true);
    if (want == 0 && user_memory_faults(m, *range, write)) want = EFAULT;
  }
  uint8_t* buf = scratch().data();
  fill_pattern(buf, len, mode);
  const Status& s =
      note(write ? acc->access->write(iova, buf, len) : acc->access->read(iova, buf, len));
  FUZZ_CHECK(s.code() == want, "%s(%#lx, %#lx) gave %s, model %s", write ? "write" : "read", iova,
             len, errno_name(s.code()), errno_name(want));
  // A write marks its pages once the coverage walk passed, before the first
  // byte moves: also when the copy then faults.
  if (write && len > 0 && (want == 0 || want == EFAULT)) acc->io->mark_dirty(iova, len);
  if (s && len > 0) check_host_bytes(m, iova, buf, len, write ? "access write" : "access read");
}

void op_dma(Reader& in) {
  DomainModel* d = w->domain[in.u8() & 1].get();
  if (d == nullptr) return;
  const IoasModel* m = d->attached;
  const uint8_t mode = in.u8();
  const bool write = (mode & 1) != 0;
  const uint64_t iova = pick_iova_rel(in, m);
  uint64_t len = pick_len_rel(in, m, iova);
  if (len > kRwMax) len = len % (kRwMax + 1);
  w->probe_iova = iova;
  const uint32_t need = write ? kProtWrite : kProtRead;
  int want = 0;
  bool fault = false;
  const auto range = range_of(iova, len);
  if (len == 0) {
    want = 0;
  } else if (!range) {
    want = EOVERFLOW;
  } else {
    // Byte by mapping: aperture, presence, permission; simulated memory is
    // ENXIO only once the whole range checked out.
    bool simulated = false;
    uint64_t pos = iova;
    for (;;) {
      const AreaModel* a = (m != nullptr && d->in_aperture(pos)) ? m->find(pos) : nullptr;
      if (a == nullptr) {
        want = EFAULT;
        fault = true;
        break;
      }
      if ((a->prot & need) != need) {
        want = EPERM;
        fault = true;
        break;
      }
      simulated = simulated || a->src.kind() == SourceKind::simulated;
      if (a->last() >= range->last) break;
      pos = a->last() + 1;
    }
    if (want == 0 && simulated) want = ENXIO;
  }
  uint8_t* buf = scratch().data();
  fill_pattern(buf, len, mode);
  const Status& s =
      note(write ? d->domain->dma_write(iova, buf, len) : d->domain->dma_read(iova, buf, len));
  FUZZ_CHECK(s.code() == want, "dma_%s(%#lx, %#lx) gave %s, model %s", write ? "write" : "read",
             iova, len, errno_name(s.code()), errno_name(want));
  if (fault) ++d->expected_faults;
  if (s && write && len > 0) d->attached->mark_dirty(iova, len);
  if (s && len > 0) check_host_bytes(*m, iova, buf, len, write ? "dma_write" : "dma_read");
}

void op_translate(Reader& in) {
  DomainModel* d = w->domain[in.u8() & 1].get();
  if (d == nullptr) return;
  const uint8_t b = in.u8();
  const uint64_t iova = pick_iova_rel(in, d->attached);
  w->probe_iova = iova;
  const uint32_t access = b % 5;  // 0 and 4 are invalid
  if (access == 0 || access == 4) {
    const auto& t = note(d->domain->translate(iova, access));
    FUZZ_CHECK(t.code() == EINVAL, "translate with access %u gave %s", access,
               errno_name(t.code()));
    return;
  }
  if (access == 3) {
    // Both at once: succeeds only on a read-write mapping.
    const AreaModel* a =
        (d->attached != nullptr && d->in_aperture(iova)) ? d->attached->find(iova) : nullptr;
    const auto& t = note(d->domain->translate(iova, 3));
    const int want = a == nullptr ? EFAULT : (a->prot == 3 ? 0 : EPERM);
    FUZZ_CHECK(t.code() == want, "translate(%#lx, RW) gave %s, model %s", iova,
               errno_name(t.code()), errno_name(want));
    if (!t.ok()) ++d->expected_faults;
    return;
  }
  check_translation(*d, iova, access);
}

void op_take_faults(Reader& in) {
  DomainModel* d = w->domain[in.u8() & 1].get();
  if (d == nullptr) return;
  const auto faults = d->domain->take_faults();
  FUZZ_CHECK(faults.size() <= d->cfg.fault_log_capacity, "fault log returned %zu > capacity %zu",
             faults.size(), d->cfg.fault_log_capacity);
  for (const IommuFault& f : faults) {
    FUZZ_CHECK(f.requested != 0 && (f.requested & ~3U) == 0, "fault with requested %#x",
               f.requested);
    FUZZ_CHECK(f.reason == FaultReason::not_present || f.reason == FaultReason::permission ||
                   f.reason == FaultReason::outside_aperture,
               "fault with a bad reason");
    if (f.reason == FaultReason::outside_aperture) {
      FUZZ_CHECK(!d->in_aperture(f.iova), "outside_aperture fault at %#lx inside the aperture",
                 f.iova);
    }
  }
}

}  // namespace iomm::fuzz::ioas_sequence
