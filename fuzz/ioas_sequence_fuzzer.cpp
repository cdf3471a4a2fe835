// Sequence fuzzer for the IOAS API (issue #4).
//
// Each input is a program: a 4-byte header (the two IOAS's options and the
// two configured memlock limits) followed by operations, one opcode byte and
// its argument bytes each (see the Op enum and the op_* functions; bytes past
// the end read as 0). The program drives two IOAS slots, two SoftDomain slots
// and two Access slots over memory from a memfd, a read-only memfd, simulated
// sources and this process's memory (read-write, read-only and PROT_NONE).
//
// A shadow model mirrors every object. After each step the library must agree
// with it exactly:
// - every error is one the call's contract lists, and where the model can
//   tell (unmap, pin, rw, DMA, translate, attach conflicts, reservations) it is
//   exactly the errno the model predicts;
// - a failed call changed nothing (mappings, counters and pins still equal the
//   model, which a failure does not touch);
// - mappings() and counters() of each IOAS, pin counts of each access, the
//   mapped bytes and fault counts of each domain;
// - the process's pinned bytes (real and simulated) equal the distinct pages
//   of (mappings of IOAS with a domain) U (access pins), per backing object;
//   each owner's charge equals the distinct pages it pays for; VmLck equals
//   the real pinned bytes; a charge that grew is within the owner's limit;
// - translate() of probe IOVAs (area edges and their neighbours) in every
//   attached domain points exactly at the backing of the mapped area, or
//   faults when nothing is mapped there.
// At the end of the input everything is torn down and every counter and
// VmLck must be zero. Any violation aborts, which libFuzzer records as a crash.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "fuzz_common.hpp"
#include "iomm/access.hpp"
#include "iomm/accounting.hpp"
#include "iomm/domain.hpp"
#include "iomm/ioas.hpp"
#include "iomm/source.hpp"
#include "mem/mem_object.hpp"  // dma_address() of a source's backing, for translate checks

namespace {

using namespace iomm;
using iomm::fuzz::Reader;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kGiB = 1024 * kMiB;
constexpr uint64_t kMax = UINT64_MAX;
constexpr size_t kMaxSteps = 96;
constexpr uint64_t kRwMax = 256 * kKiB;  // longest read/write/DMA buffer

// ---------------------------------------------------------------------------
// Process-wide memory (created once, reused by every input).

struct Fixtures {
  int file_rw_fd = -1;  // memfd, read-write
  uint64_t file_rw_size = 1 * kMiB;
  int file_ro_fd = -1;  // a second memfd, opened read-only
  uint64_t file_ro_size = 64 * kKiB;
  std::optional<MemorySource> file_rw_whole, file_ro_whole;  // keep the file objects mapped
  std::optional<MemorySource> sim[2];
  uint64_t sim_size = 1 * kGiB;
  // User memory: [read-write | read-only | PROT_NONE], contiguous.
  uint8_t* user = nullptr;
  uint64_t user_rw = 256 * kKiB, user_ro = 16 * kKiB, user_none = 16 * kKiB;
  [[nodiscard]] uint64_t user_total() const { return user_rw + user_ro + user_none; }
  bool charged = true;  // CAP_IPC_LOCK dropped: mappings are charged
  uint64_t rlimit = 0;  // RLIMIT_MEMLOCK
};
Fixtures* fx = nullptr;

int make_memfd(const char* name, uint64_t size) {
  const int fd = memfd_create(name, MFD_CLOEXEC);
  if (fd < 0 || ftruncate(fd, static_cast<off_t>(size)) != 0) {
    std::perror("memfd");
    std::abort();
  }
  return fd;
}

void setup_fixtures() {
  fx = new Fixtures();
  fx->charged = iomm::fuzz::drop_ipc_lock();
  struct rlimit rl {};
  getrlimit(RLIMIT_MEMLOCK, &rl);
  fx->rlimit = rl.rlim_cur;
  fx->file_rw_fd = make_memfd("iomm-fuzz-rw", fx->file_rw_size);
  const int ro_backing = make_memfd("iomm-fuzz-ro", fx->file_ro_size);
  const std::string path = "/proc/self/fd/" + std::to_string(ro_backing);
  fx->file_ro_fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fx->file_ro_fd < 0) std::abort();
  close(ro_backing);
  fx->file_rw_whole = MemorySource::from_file(fx->file_rw_fd, 0, fx->file_rw_size).value();
  fx->file_ro_whole = MemorySource::from_file(fx->file_ro_fd, 0, fx->file_ro_size).value();
  for (auto& s : fx->sim) s = MemorySource::simulated(fx->sim_size).value();
  void* p =
      mmap(nullptr, fx->user_total(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) std::abort();
  fx->user = static_cast<uint8_t*>(p);
  std::memset(fx->user, 0x5a, fx->user_rw + fx->user_ro);
  mprotect(fx->user + fx->user_rw, fx->user_ro, PROT_READ);
  mprotect(fx->user + fx->user_rw + fx->user_ro, fx->user_none, PROT_NONE);
}

// ---------------------------------------------------------------------------
// Shadow model.

enum OwnerKey { kNoOwner = -1, kProcessOwner = 0, kUserOwner = 1 };

struct AreaModel {
  uint64_t iova;
  uint64_t len;
  uint32_t prot;
  MemorySource src;
  int owner;
  [[nodiscard]] uint64_t last() const { return iova + len - 1; }
  [[nodiscard]] IovaRange range() const { return {iova, last()}; }
};

uint64_t dma_address(const MemorySource& s, uint64_t skip = 0) {
  return s.object()->dma_address(s.offset() + skip);
}

struct DomainModel;

struct IoasModel {
  std::shared_ptr<Ioas> ioas;
  AccountMode mode = AccountMode::per_process;
  uint32_t max_mappings = kDefaultMaxMappings;
  std::map<uint64_t, AreaModel> areas;
  std::vector<std::shared_ptr<DomainModel>> domains;
  std::vector<IovaRange> user_reserved;
  std::vector<IovaRange> allowed;  // sorted
  uint64_t accesses = 0;

  ~IoasModel();
  [[nodiscard]] int owner() const {
    if (!fx->charged) return kNoOwner;
    switch (mode) {
      case AccountMode::none:
        return kNoOwner;
      case AccountMode::per_process:
        return kProcessOwner;
      case AccountMode::per_user:
        return kUserOwner;
    }
    return kNoOwner;
  }
  [[nodiscard]] uint64_t alignment() const;
  [[nodiscard]] std::vector<IovaRange> reserved() const;
  // The areas overlapping r, in IOVA order.
  [[nodiscard]] std::vector<const AreaModel*> overlapping(const IovaRange& r) const {
    std::vector<const AreaModel*> out;
    for (const auto& [start, a] : areas) {
      if (a.range().overlaps(r)) out.push_back(&a);
    }
    return out;
  }
  [[nodiscard]] const AreaModel* find(uint64_t iova) const {
    auto it = areas.upper_bound(iova);
    if (it == areas.begin()) return nullptr;
    --it;
    return it->second.last() >= iova ? &it->second : nullptr;
  }
};

struct DomainModel {
  std::shared_ptr<SoftDomain> domain;
  DomainConfig cfg;
  IoasModel* attached = nullptr;
  uint64_t expected_faults = 0;

  [[nodiscard]] std::vector<IovaRange> reservations() const {
    std::vector<IovaRange> out = cfg.reserved;
    if (cfg.aperture_start > 0) out.push_back({0, cfg.aperture_start - 1});
    if (cfg.aperture_last < kMax) out.push_back({cfg.aperture_last + 1, kMax});
    return out;
  }
  [[nodiscard]] bool in_aperture(uint64_t iova) const {
    return iova >= cfg.aperture_start && iova <= cfg.aperture_last;
  }
};

IoasModel::~IoasModel() {
  ioas.reset();  // unmaps everything and detaches every domain
  for (auto& d : domains) d->attached = nullptr;
}

uint64_t IoasModel::alignment() const {
  uint64_t a = 1;
  for (const auto& d : domains) a = std::max(a, d->cfg.min_page_size);
  if (accesses > 0) a = std::max(a, kPageSize);
  return a;
}

std::vector<IovaRange> IoasModel::reserved() const {
  std::vector<IovaRange> out = user_reserved;
  for (const auto& d : domains) {
    for (const IovaRange& r : d->reservations()) out.push_back(r);
  }
  return out;
}

struct AccessModel;
std::optional<IovaRange> g_unmap_request;  // the range of the unmap in progress

struct AccessModel {
  std::shared_ptr<IoasModel> io;  // declared first: destroyed after the access
  std::mutex mu;
  std::vector<std::pair<uint64_t, uint64_t>> pins;  // iova, length; guarded by mu
  bool refuse_alternate = false;                    // ignore every other notification (retry path)
  bool probe_in_callback = false;                   // try pin/read of the range being unmapped
  uint64_t notifications = 0;
  std::shared_ptr<Access> access;

  ~AccessModel() {
    access.reset();  // unpins what it still holds
    if (io) --io->accesses;
  }

  void on_unmap(const IovaRange& r) {
    std::lock_guard lk(mu);
    FUZZ_CHECK(access != nullptr, "unmap callback before create returned");
    FUZZ_CHECK(g_unmap_request.has_value() && g_unmap_request->contains(r),
               "callback range [%#lx, %#lx] is not inside the unmap in progress", r.start, r.last);
    const bool overlaps = std::any_of(pins.begin(), pins.end(), [&](const auto& p) {
      return IovaRange{p.first, p.first + p.second - 1}.overlaps(r);
    });
    FUZZ_CHECK(overlaps, "callback for [%#lx, %#lx] on an access with no pin there", r.start,
               r.last);
    if (refuse_alternate && (notifications++ % 2) == 0) return;
    if (probe_in_callback) {
      // New pins and rw of a range being unmapped fail with EINVAL.
      auto pin = access->pin(r.start & ~(kPageSize - 1), kPageSize, kProtRead);
      FUZZ_CHECK(pin.code() == EINVAL, "pin inside the unmapping range gave %s",
                 errno_name(pin.code()));
      uint8_t byte = 0;
      auto rd = access->read(r.start, &byte, 1);
      FUZZ_CHECK(rd.code() == EINVAL, "read inside the unmapping range gave %s",
                 errno_name(rd.code()));
    }
    std::erase_if(pins, [&](const auto& p) {
      if (!IovaRange{p.first, p.first + p.second - 1}.overlaps(r)) return false;
      Status s = access->unpin(p.first, p.second);
      FUZZ_CHECK(s.ok(), "unpin of a held pin failed in the callback: %s",
                 s.error().describe().c_str());
      return true;
    });
  }
};

// The world of one input.
struct World {
  std::shared_ptr<IoasModel> ioas[2];
  std::shared_ptr<DomainModel> domain[2];
  std::unique_ptr<AccessModel> access[2];
  std::optional<uint64_t> limit[2];  // configured limits: per_process, per_user
  uint64_t last_charge[2] = {0, 0};
  uint64_t probe_iova = 0;

  std::vector<IoasModel*> live_ioas() const {
    std::vector<IoasModel*> out;
    for (const auto& m : ioas) {
      if (m) out.push_back(m.get());
    }
    for (const auto& a : access) {
      if (a && std::find(out.begin(), out.end(), a->io.get()) == out.end()) {
        out.push_back(a->io.get());
      }
    }
    return out;
  }
  std::vector<DomainModel*> live_domains() const {
    std::vector<DomainModel*> out;
    for (const auto& d : domain) {
      if (d) out.push_back(d.get());
    }
    for (IoasModel* m : live_ioas()) {
      for (const auto& d : m->domains) {
        if (std::find(out.begin(), out.end(), d.get()) == out.end()) out.push_back(d.get());
      }
    }
    return out;
  }
  std::vector<AccessModel*> accesses_of(const IoasModel* m) const {
    std::vector<AccessModel*> out;
    for (const auto& a : access) {
      if (a && a->io.get() == m) out.push_back(a.get());
    }
    return out;
  }
};

World* w = nullptr;

// ---------------------------------------------------------------------------
// Value pickers: small tables of interesting values, page multiples, or raw.

constexpr uint64_t kIovaTable[] = {
    0,
    1,
    0x800,
    0x1000,
    0x2000,
    0x10000,
    0x100000,
    0x200000,
    0x400000,
    0x1000000,
    0xfee00000,
    (1ULL << 39) - 0x1000,
    1ULL << 47,
    (1ULL << 48) - 0x1000,
    1ULL << 48,
    kMax,
    kMax - 0xfff,
    kMax - 0x1fff,
    kMax - 1,
    kMax - 0x1000,
};
constexpr uint64_t kLenTable[] = {
    0,       1,       0xfff,    0x1000,   0x1001,     0x2000,     0x3000, 0x8000,
    0x10000, 0x40000, 0x100000, 0x200000, 1ULL << 30, 1ULL << 47, kMax,   kMax - 0xfff,
};
constexpr size_t kIovaN = std::size(kIovaTable);
constexpr size_t kLenN = std::size(kLenTable);

uint64_t pick_iova_byte(Reader& in, uint8_t b) {
  if (b < kIovaN) return kIovaTable[b];
  if (b == 0xff) return in.u64();
  return (b - kIovaN) * kPageSize;
}

uint64_t pick_len(Reader& in) {
  const uint8_t b = in.u8();
  if (b < kLenN) return kLenTable[b];
  if (b == 0xff) return in.u64();
  return (b - kLenN) * kPageSize;
}

// An IOVA relative to an existing mapping (0xc0..0xfe), or a plain pick.
uint64_t pick_iova_rel(Reader& in, const IoasModel* m) {
  const uint8_t b = in.u8();
  if (b >= 0xc0 && b != 0xff && m != nullptr && !m->areas.empty()) {
    auto it = m->areas.begin();
    std::advance(it, (b - 0xc0) % m->areas.size());
    const AreaModel& a = it->second;
    const uint64_t deltas[] = {0,
                               kPageSize,
                               (a.len / 2) & ~(kPageSize - 1),
                               a.len - kPageSize,
                               a.len,
                               uint64_t{0} - kPageSize,
                               1,
                               a.len - 1};
    return a.iova + deltas[in.u8() % std::size(deltas)];
  }
  return pick_iova_byte(in, b);
}

// A length relative to the mappings at iova (0xe0..0xfe: to the end of the
// k-th mapping from there), or a plain pick.
uint64_t pick_len_rel(Reader& in, const IoasModel* m, uint64_t iova) {
  const uint8_t b = in.u8();
  if (b >= 0xe0 && b != 0xff && m != nullptr) {
    auto it = m->areas.lower_bound(iova);
    if (const AreaModel* a = m->find(iova)) it = m->areas.find(a->iova);
    for (int k = (b - 0xe0) % 4; k > 0 && it != m->areas.end(); --k) ++it;
    if (it != m->areas.end()) return it->second.last() - iova + 1;
    return kPageSize;
  }
  if (b < kLenN) return kLenTable[b];
  if (b == 0xff) return in.u64();
  return (b - kLenN) * kPageSize;
}

uint32_t pick_prot(uint8_t b) {
  uint32_t p = b & 3;
  if ((b & 0x80) != 0) p |= 4;  // an unknown bit
  return p;
}

// ---------------------------------------------------------------------------
// Checks.

int g_last_code = -1;  // errno of the op's main library call (0 = success, -1 = none made)
template <typename R>
R note(R r) {
  g_last_code = r.code();
  return r;
}

std::optional<IovaRange> range_of(uint64_t iova, uint64_t len) { return make_range(iova, len); }

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
  FUZZ_CHECK(m.ioas->iova_ranges() == holes_of(m.reserved()),
             "iova_ranges() disagrees with the reserved ranges");
}

void check_all() {
  for (IoasModel* m : w->live_ioas()) check_ioas(*m);
  for (const auto& acc : w->access) {
    if (!acc) continue;
    uint64_t bytes = 0;
    for (const auto& p : acc->pins) bytes += p.second;
    FUZZ_CHECK(acc->access->pin_count() == acc->pins.size() && acc->access->pinned_bytes() == bytes,
               "access pins %lu / %#lx bytes, model %zu / %#lx", acc->access->pin_count(),
               acc->access->pinned_bytes(), acc->pins.size(), bytes);
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

// Checks a newly created run of areas [iova, iova + total) against the model's
// placement rules, before it is added.
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

// Which errno the coverage walk of an access pin/rw gives (0 = covered).
// Mirrors the contract: a hole is ENOENT, a mapping without the prot is EPERM,
// simulated memory is ENXIO for rw.
int walk(const IoasModel& m, const IovaRange& r, uint32_t need, bool rw) {
  uint64_t pos = r.start;
  for (const AreaModel* a : m.overlapping(r)) {
    if (a->iova > pos) return ENOENT;
    if ((a->prot & need) != need) return EPERM;
    if (rw && a->src.kind() == SourceKind::simulated) return ENXIO;
    if (a->last() >= r.last) return 0;
    pos = a->last() + 1;
  }
  return ENOENT;
}

// Host bytes behind [iova, +len) of m, if every page is real memory and no
// page is reached twice (an aliased write would not read back).
struct HostPiece {
  uint8_t* host;
  uint64_t len;
};
std::optional<std::vector<HostPiece>> host_pieces(const IoasModel& m, uint64_t iova, uint64_t len) {
  std::vector<HostPiece> out;
  std::vector<PageRun> runs;
  const IovaRange r{iova, iova + len - 1};
  for (const AreaModel* a : m.overlapping(r)) {
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

void check_host_bytes(const IoasModel& m, uint64_t iova, const uint8_t* buf, uint64_t len,
                      const char* what) {
  auto pieces = host_pieces(m, iova, len);
  if (!pieces) return;
  uint64_t off = 0;
  for (const HostPiece& p : *pieces) {
    FUZZ_CHECK(std::memcmp(p.host, buf + off, p.len) == 0,
               "%s: memory behind [%#lx, +%#lx) differs from the buffer", what, iova + off, p.len);
    off += p.len;
  }
}

// ---------------------------------------------------------------------------
// Operations.

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

void op_map(Reader& in) {
  IoasModel* m = ioas_slot(in);
  std::optional<MemorySource> src;
  if (!make_source(in, &src)) return;
  const uint8_t pb = in.u8();
  const uint32_t prot = pick_prot(pb);
  std::optional<uint64_t> fixed;
  if ((pb & 4) != 0) fixed = pick_iova_rel(in, m);
  w->probe_iova = fixed.value_or(0);
  const auto& r = note(m->ioas->map(*src, prot, fixed));
  FUZZ_CHECK_ERRNO(r, "map", EOVERFLOW, EINVAL, EEXIST, ENOSPC, EPERM, EFAULT, ENOMEM);
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
  const auto& r = note(dst->ioas->copy_from(*src->ioas, src_iova, len, prot, fixed));
  FUZZ_CHECK_ERRNO(r, "copy_from", EOVERFLOW, EINVAL, EEXIST, ENOSPC, EPERM, ENOENT, EFAULT,
                   ENOMEM);
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

// Removes the model's areas inside r after a successful unmap, checking that
// every access let go of its pins there.
void unmap_model(IoasModel& m, const IovaRange& r) {
  for (AccessModel* acc : w->accesses_of(&m)) {
    for (const auto& [iova, len] : acc->pins) {
      FUZZ_CHECK(!(IovaRange{iova, iova + len - 1}.overlaps(r)),
                 "access pin [%#lx, +%#lx) survived an unmap of [%#lx, %#lx]", iova, len, r.start,
                 r.last);
    }
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
  FUZZ_CHECK(s.code() != EADDRINUSE && s.code() != EBUSY && s.code() != EINVAL,
             "attach without conflict gave %s: %s", errno_name(s.code()),
             s.ok() ? "" : s.error().message().c_str());
  if (s.code() == EFAULT) {
    FUZZ_CHECK(m->domains.empty(), "attach of a second domain failed to pin: %s",
               s.error().describe().c_str());
  }
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

std::vector<uint8_t>& scratch() {
  static auto* buf = new std::vector<uint8_t>(kRwMax);
  return *buf;
}

void fill_pattern(uint8_t* p, size_t n, uint8_t seed) {
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(seed + i * 7);
}

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
  }
  uint8_t* buf = scratch().data();
  fill_pattern(buf, len, mode);
  const Status& s =
      note(write ? acc->access->write(iova, buf, len) : acc->access->read(iova, buf, len));
  if (want != 0 || s.code() != EFAULT) {
    FUZZ_CHECK(s.code() == want, "%s(%#lx, %#lx) gave %s, model %s", write ? "write" : "read", iova,
               len, errno_name(s.code()), errno_name(want));
  }
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

IovaRange pick_range(Reader& in, const IoasModel* m) {
  const uint64_t start = pick_iova_rel(in, m);
  const uint64_t len = pick_len(in);
  return {start, start + len - 1};  // may wrap: start > last
}

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

const std::optional<uint64_t> kLimits[] = {std::nullopt, 0,        16 * kKiB,
                                           256 * kKiB,   1 * kMiB, 4 * kMiB};

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

enum Op : uint8_t {
  kMap,
  kUnmap,
  kCopy,
  kAttach,
  kDetach,
  kDomainCreate,
  kAccessCreate,
  kAccessDestroy,
  kPin,
  kUnpin,
  kAccessRw,
  kDma,
  kTranslate,
  kSetAllowed,
  kReserved,
  kRecreateIoas,
  kSetLimit,
  kTakeFaults,
  kOpCount,
};

const char* const kOpNames[] = {
    "map",           "unmap",
    "copy_from",     "attach",
    "detach",        "domain_create",
    "access_create", "access_destroy",
    "pin",           "unpin",
    "access_rw",     "dma",
    "translate",     "set_allowed_ranges",
    "reserved",      "recreate_ioas",
    "set_limit",     "take_faults",
};
static_assert(std::size(kOpNames) == kOpCount);

// Outcome statistics per operation, printed at exit with IOMM_FUZZ_STATS=1
// (to see that the corpus reaches deep states, not only argument errors).
struct OpStats {
  uint64_t runs = 0;
  uint64_t ok = 0;
  std::map<int, uint64_t> errors;
};
OpStats g_stats[kOpCount];

bool g_trace = false;  // IOMM_FUZZ_TRACE=1: print each step and its outcome

void print_stats() {
  for (int i = 0; i < kOpCount; ++i) {
    std::fprintf(stderr, "%-20s runs %8lu ok %8lu", kOpNames[i], g_stats[i].runs, g_stats[i].ok);
    for (const auto& [code, n] : g_stats[i].errors)
      std::fprintf(stderr, " %s:%lu", errno_name(code), n);
    std::fprintf(stderr, "\n");
  }
}

void run_op(Op op, Reader& in) {
  switch (op) {
    case kMap:
      return op_map(in);
    case kUnmap:
      return op_unmap(in);
    case kCopy:
      return op_copy(in);
    case kAttach:
      return op_attach(in, true);
    case kDetach:
      return op_attach(in, false);
    case kDomainCreate:
      return op_domain_create(in);
    case kAccessCreate:
      return op_access_create(in);
    case kAccessDestroy:
      w->access[in.u8() & 1].reset();
      return;
    case kPin:
      return op_pin(in);
    case kUnpin:
      return op_unpin(in);
    case kAccessRw:
      return op_access_rw(in);
    case kDma:
      return op_dma(in);
    case kTranslate:
      return op_translate(in);
    case kSetAllowed:
      return op_set_allowed(in);
    case kReserved:
      return op_reserved(in);
    case kRecreateIoas:
      return op_recreate_ioas(in);
    case kSetLimit:
      return op_set_limit(in);
    case kTakeFaults:
      return op_take_faults(in);
    case kOpCount:
      break;
  }
}

void check_clean(const char* when) {
  const Counters c = counters();
  FUZZ_CHECK(c.pinned_bytes == 0 && c.simulated_pinned_bytes == 0 && c.charged_bytes == 0 &&
                 c.vmlck_bytes == 0 && process_vmlck_bytes() == 0,
             "%s: pinned %#lx, simulated %#lx, charged %#lx, VmLck %#lx", when, c.pinned_bytes,
             c.simulated_pinned_bytes, c.charged_bytes, c.vmlck_bytes);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  setup_fixtures();
  if (const char* e = std::getenv("IOMM_FUZZ_STATS"); e != nullptr && *e == '1') {
    std::atexit(print_stats);
  }
  if (const char* e = std::getenv("IOMM_FUZZ_TRACE"); e != nullptr && *e == '1') g_trace = true;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (fx == nullptr) setup_fixtures();
  Reader in(data, size);
  iomm::fuzz::g_step_index = -1;
  iomm::fuzz::g_step_name = "setup";
  check_clean("before the input");

  w = new World();
  const uint8_t h0 = in.u8();
  const uint8_t h1 = in.u8();
  w->limit[kProcessOwner] = kLimits[in.u8() % std::size(kLimits)];
  w->limit[kUserOwner] = kLimits[in.u8() % std::size(kLimits)];
  FUZZ_CHECK(set_memlock_limit(AccountMode::per_process, 0, w->limit[kProcessOwner]).ok() &&
                 set_memlock_limit(AccountMode::per_user, 0, w->limit[kUserOwner]).ok(),
             "set_memlock_limit failed");
  w->ioas[0] = create_ioas(h0);
  w->ioas[1] = create_ioas(h1);

  for (size_t step = 0; step < kMaxSteps && !in.empty(); ++step) {
    const Op op = static_cast<Op>(in.u8() % kOpCount);
    iomm::fuzz::g_step_index = static_cast<int>(step);
    iomm::fuzz::g_step_name = kOpNames[op];
    g_last_code = -1;
    run_op(op, in);
    ++g_stats[op].runs;
    if (g_last_code == 0) ++g_stats[op].ok;
    if (g_last_code > 0) ++g_stats[op].errors[g_last_code];
    if (g_trace) {
      std::fprintf(stderr, "step %2zu %-18s -> %s\n", step, kOpNames[op],
                   g_last_code < 0    ? "(no call)"
                   : g_last_code == 0 ? "ok"
                                      : errno_name(g_last_code));
    }
    check_all();
  }

  // Teardown: accesses, then address spaces, then domains.
  iomm::fuzz::g_step_name = "teardown";
  for (auto& a : w->access) a.reset();
  for (auto& m : w->ioas) m.reset();
  for (auto& d : w->domain) {
    if (d) {
      FUZZ_CHECK(d->attached == nullptr, "domain still attached after its IOAS died");
      FUZZ_CHECK(d->domain->counters().mapped_bytes == 0, "detached domain still maps bytes");
    }
    d.reset();
  }
  delete w;
  w = nullptr;
  check_clean("after teardown");
  return 0;
}
