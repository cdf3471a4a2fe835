// Fault injection (issue 4; iommufd's fail_nth in user space): each scenario
// is run failing the 1st, 2nd, ... injection point it reaches, until a run
// reaches no point. After each run:
// - a call that failed left the state exactly as before the call
//   (mappings, translations, pins, charges, VmLck, accesses, reservations);
// - a call that recovered (e.g. an unmap retrying after a callback that did
//   not unpin) left the same state as a run with no injection;
// - tearing the world down returns every count to zero; LeakSanitizer (ASan
//   preset) checks that nothing leaked.
// Coverage is by site (file and line): the build lists every IOMM_INJECT in
// src/ (tests/list_inject_sites.cmake) and EverySiteIsFailed checks that some
// scenario failed each of them. Adding a scenario is one entry in scenarios()
// or vfio_scenarios(); adding a site is one IOMM_INJECT in src/ (plus its
// name in docs/testing.md) and, if no scenario reaches it yet, a scenario.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/vfio.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <functional>
#include <iostream>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "fault/fail_nth.hpp"
#include "iomm/access.hpp"
#include "iomm/notifier.hpp"
#include "iomm/vfio_compat.h"
#include "test_support.hpp"

namespace iomm {
namespace {

constexpr uint32_t kRW = kProtRead | kProtWrite;
constexpr uint64_t kMiB = 1 << 20;

// Every injection site in src/, listed at build time: {"src/<path>:<line>",
// "<name>"}.
struct Site {
  const char* site;
  const char* name;
};
const Site kSites[] = {
#include "inject_sites.inc"
};

// The objects a scenario works on. The memfd, user buffer and spare domain
// exist from the start; everything else is made by the scenario's setup.
struct World {
  test::Memfd mfd{4 * kMiB};
  void* user = mmap(nullptr, kMiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  std::shared_ptr<Ioas> a = Ioas::create({}).value();
  std::shared_ptr<Ioas> b = Ioas::create({}).value();
  std::vector<std::shared_ptr<SoftDomain>> domains;  // attached to a, in order
  std::shared_ptr<SoftDomain> spare = SoftDomain::create({}).value();
  std::mutex pins_mu;
  std::vector<std::pair<uint64_t, uint64_t>> pins;
  std::shared_ptr<Access> access;
  std::shared_ptr<SoftDomain> created;  // made by a scenario's op

  World() = default;
  World(const World&) = delete;
  World& operator=(const World&) = delete;
  ~World() {
    access.reset();
    a.reset();
    b.reset();
    munmap(user, kMiB);
  }

  // For setups, which run with no injection.
  MemorySource file(uint64_t offset, uint64_t length) const {
    return MemorySource::from_file(mfd.fd(), offset, length).value();
  }
  // For ops: creating the source is part of what may fail.
  Result<uint64_t> map_file(Ioas& ioas, uint64_t offset, uint64_t length,
                            std::optional<uint64_t> iova) const {
    auto src = MemorySource::from_file(mfd.fd(), offset, length);
    if (!src.ok()) return src.error();
    return ioas.map(*src, kRW, iova);
  }
  void attach_domains(int n) {
    for (int i = 0; i < n; ++i) {
      domains.push_back(SoftDomain::create({}).value());
      ASSERT_OK(a->attach(domains.back()));
    }
  }
  void make_access() {
    access = Access::create(a, [this](const IovaRange& r) {
               std::lock_guard lk(pins_mu);
               std::erase_if(pins, [&](const auto& p) {
                 if (!IovaRange{p.first, p.first + p.second - 1}.overlaps(r)) return false;
                 EXPECT_TRUE(access->unpin(p.first, p.second).ok());
                 return true;
               });
             }).value();
  }
  Status pin(uint64_t iova, uint64_t length) {
    std::lock_guard lk(pins_mu);
    auto r = access->pin(iova, length, kRW);
    if (!r.ok()) return r.error();
    pins.emplace_back(iova, length);
    return {};
  }
};

using MappingRow = std::tuple<uint64_t, uint64_t, uint32_t, bool, uint32_t>;

struct Snapshot {
  std::vector<MappingRow> maps_a, maps_b;
  std::vector<IovaRange> ranges_a, ranges_b;
  uint64_t domains_a = 0, accesses_a = 0, align_a = 0, align_b = 0;
  // Per domain: mapped bytes, leaves 4K/2M/1G, faults recorded and dropped.
  std::vector<std::tuple<uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t>> domain_tables;
  uint64_t pinned = 0, charged = 0, vmlck = 0, access_pins = 0, access_page_pins = 0;
  // Dirty tracking of a and b, and (while on) the log over the first 16 MiB.
  bool dirty_a = false, dirty_b = false;
  std::vector<uint64_t> dirty_log_a, dirty_log_b;
  bool spare_attached_elsewhere_ok = false;

  bool operator==(const Snapshot&) const = default;
};

std::vector<MappingRow> rows(const Ioas& ioas) {
  std::vector<MappingRow> out;
  for (const MappingInfo& m : ioas.mappings()) {
    out.emplace_back(m.iova, m.length, m.prot, m.pinned, m.access_pins);
  }
  return out;
}

Snapshot snapshot(World& w) {
  Snapshot s;
  s.maps_a = rows(*w.a);
  s.maps_b = rows(*w.b);
  s.ranges_a = w.a->iova_ranges();
  s.ranges_b = w.b->iova_ranges();
  s.domains_a = w.a->counters().domains;
  s.accesses_a = w.a->counters().accesses;
  s.align_a = w.a->counters().iova_alignment;
  s.align_b = w.b->counters().iova_alignment;
  auto tables = [&](const SoftDomain& d) {
    const DomainCounters c = d.counters();
    s.domain_tables.emplace_back(c.mapped_bytes, c.leaves_4k, c.leaves_2m, c.leaves_1g, c.faults,
                                 c.faults_dropped);
  };
  for (const auto& d : w.domains) tables(*d);
  tables(*w.spare);
  auto dirty_log = [](Ioas& ioas, bool& on, std::vector<uint64_t>& log) {
    on = ioas.dirty_tracking();
    if (!on) return;
    log.assign(16 * kMiB / kPageSize / 64, 0);
    EXPECT_TRUE(ioas.peek_dirty(0, 16 * kMiB, log).ok());
  };
  dirty_log(*w.a, s.dirty_a, s.dirty_log_a);
  dirty_log(*w.b, s.dirty_b, s.dirty_log_b);
  const Counters c = counters();
  s.pinned = c.pinned_bytes + c.simulated_pinned_bytes;
  s.charged = c.charged_bytes;
  s.vmlck = c.vmlck_bytes;
  s.access_pins = w.access ? w.access->pin_count() : 0;
  s.access_page_pins = w.access ? w.access->page_pinned_count() : 0;
  // Whether the spare domain is free: attaching it to a scratch IOAS works.
  auto scratch = Ioas::create({}).value();
  s.spare_attached_elsewhere_ok = scratch->attach(w.spare).ok();
  if (s.spare_attached_elsewhere_ok) {
    EXPECT_TRUE(scratch->detach(w.spare).ok());
  }
  return s;
}

template <typename W>
struct BasicScenario {
  const char* name;
  std::function<void(W&)> setup;
  std::function<Status(W&)> op;
};
using Scenario = BasicScenario<World>;

template <typename T>
Status status_of(const Result<T>& r) {
  return r.ok() ? Status() : Status(r.error());
}

const std::vector<Scenario>& scenarios() {
  static const std::vector<Scenario> list = {
      {"MapNoDomain", [](World&) {},
       [](World& w) { return status_of(w.map_file(*w.a, 0, kMiB, 0x100000)); }},
      {"MapOneDomain", [](World& w) { w.attach_domains(1); },
       [](World& w) { return status_of(w.map_file(*w.a, 0, 2 * kMiB, 0x200000)); }},
      {"MapTwoDomains", [](World& w) { w.attach_domains(2); },
       [](World& w) { return status_of(w.map_file(*w.a, kMiB, kMiB, std::nullopt)); }},
      {"MapUserMemoryWithDomain", [](World& w) { w.attach_domains(1); },
       [](World& w) {
         return status_of(w.a->map(*MemorySource::from_user(w.user, kMiB), kRW, 0x400000));
       }},
      {"MapSimulated", [](World& w) { w.attach_domains(1); },
       [](World& w) {
         auto s = MemorySource::simulated(32 * kMiB);
         if (!s.ok()) return Status(s.error());
         return status_of(w.a->map(*s, kRW, 1ULL << 30));
       }},
      {"MapGrownFile",
       [](World& w) {
         w.attach_domains(1);
         ASSERT_OK(w.a->map(w.file(0, kMiB), kRW, 0x100000));
         ASSERT_EQ(ftruncate(w.mfd.fd(), 5 * kMiB), 0);
       },
       [](World& w) {
         auto s = MemorySource::from_file(w.mfd.fd(), 4 * kMiB, kMiB);
         if (!s.ok()) return Status(s.error());
         return status_of(w.a->map(*s, kRW, 0x800000));
       }},
      {"MapUpgradedFile",
       [](World& w) {
         // The window is first mapped read-only, and pinned through it.
         char path[64];
         std::snprintf(path, sizeof(path), "/proc/self/fd/%d", w.mfd.fd());
         const int ro = open(path, O_RDONLY | O_CLOEXEC);
         ASSERT_GE(ro, 0);
         auto s = MemorySource::from_file(ro, 0, kMiB);
         close(ro);
         ASSERT_OK(s);
         w.attach_domains(1);
         ASSERT_OK(w.a->map(*s, kProtRead, 0x100000));
       },
       [](World& w) { return status_of(w.map_file(*w.a, 0, 2 * kMiB, 0x400000)); }},
      {"UnmapTwoDomains",
       [](World& w) {
         w.attach_domains(2);
         ASSERT_OK(w.a->map(w.file(0, kMiB), kRW, 0x100000));
         ASSERT_OK(w.a->map(w.file(kMiB, kMiB), kRW, 0x300000));
         w.a->set_dirty_tracking(true);
         w.make_access();
         char byte = 1;
         ASSERT_OK(w.access->write(0x300000, &byte, 1));
       },
       [](World& w) { return status_of(w.a->unmap(0, 0x400000)); }},
      {"CopyIntoDomainedIoas",
       [](World& w) {
         w.attach_domains(2);
         ASSERT_OK(w.a->map(w.file(0, kMiB), kRW, 0x100000));
         ASSERT_OK(w.a->map(w.file(kMiB, kMiB), kRW, 0x200000));
         ASSERT_OK(w.b->attach(w.spare));
       },
       [](World& w) { return status_of(w.b->copy_from(*w.a, 0x180000, kMiB, kRW)); }},
      {"AttachFirstDomain",
       [](World& w) {
         ASSERT_OK(w.a->map(w.file(0, kMiB), kRW, 0x100000));
         ASSERT_OK(w.a->map(w.file(2 * kMiB, kMiB), kProtRead, 0x40000000));
         ASSERT_OK(w.a->map(*MemorySource::from_user(w.user, kMiB), kRW, 0x800000));
       },
       [](World& w) { return w.a->attach(w.spare); }},
      {"AttachSecondDomain",
       [](World& w) {
         w.attach_domains(1);
         ASSERT_OK(w.a->map(w.file(0, 2 * kMiB), kRW, 0x200000));
       },
       [](World& w) { return w.a->attach(w.spare); }},
      {"DetachLastDomain",
       [](World& w) {
         ASSERT_OK(w.a->map(w.file(0, kMiB), kRW, 0x100000));
         ASSERT_OK(w.a->attach(w.spare));
       },
       [](World& w) { return w.a->detach(w.spare); }},
      {"CreateDomain", [](World&) {},
       [](World& w) {
         auto d = SoftDomain::create({});
         if (!d.ok()) return Status(d.error());
         w.created = d.value();
         return Status();
       }},
      {"CreateAccess", [](World& w) { ASSERT_OK(w.a->map(w.file(0, kMiB), kRW, 0x100000)); },
       [](World& w) {
         auto a = Access::create(w.a, [](const IovaRange&) {});
         if (!a.ok()) return Status(a.error());
         w.access = a.value();
         return Status();
       }},
      {"AccessPinNoDomain",
       [](World& w) {
         ASSERT_OK(w.a->map(w.file(0, kMiB), kRW, 0x100000));
         ASSERT_OK(w.a->map(w.file(kMiB, kMiB), kRW, 0x200000));
         w.make_access();
       },
       [](World& w) { return w.pin(0x1F0000, 0x20000); }},
      {"AccessPinUnpinWithDomain",
       [](World& w) {
         w.attach_domains(1);
         ASSERT_OK(w.a->map(w.file(0, kMiB), kRW, 0x100000));
         w.make_access();
       },
       [](World& w) {
         if (Status s = w.pin(0x100000, 0x10000); !s) return s;
         std::lock_guard lk(w.pins_mu);
         w.pins.clear();
         return w.access->unpin(0x100000, 0x10000);
       }},
      // Fresh page pins around a range pin of the same access: one pin store
      // call whose granules lock as two runs, so a failure of the second
      // unlocks the first.
      {"AccessPagePinsAroundRangePin",
       [](World& w) {
         ASSERT_OK(w.a->map(w.file(0, kMiB), kRW, 0x100000));
         w.make_access();
         ASSERT_OK(w.pin(0x105000, 0x1000));
       },
       [](World& w) {
         void* host[10];
         return w.access->pin_pages(0x100000, 10, kRW, host);
       }},
      {"AccessReadWrite",
       [](World& w) {
         ASSERT_OK(w.a->map(w.file(0, kMiB), kRW, 0x100000));
         w.a->set_dirty_tracking(true);
         w.make_access();
       },
       [](World& w) {
         char buf[256] = {1};
         if (Status s = w.access->write(0x100100, buf, sizeof(buf)); !s) return s;
         return w.access->read(0x100100, buf, sizeof(buf));
       }},
      {"UnmapNotifiesAccess",
       [](World& w) {
         w.attach_domains(1);
         ASSERT_OK(w.a->map(w.file(0, kMiB), kRW, 0x100000));
         w.make_access();
         ASSERT_OK(w.pin(0x100000, 0x4000));
       },
       [](World& w) { return status_of(w.a->unmap_all()); }},
      {"WatchIovaAndSource", [](World&) {},
       [](World& w) {
         auto accept = [](IntervalNotifier&, const Invalidation&, uint64_t) { return true; };
         auto on_iova = IntervalNotifier::watch_iova(w.a, {0x100000, 0x1FFFFF}, accept);
         if (!on_iova.ok()) return Status(on_iova.error());
         auto src = MemorySource::from_file(w.mfd.fd(), 0, kMiB);
         if (!src.ok()) return Status(src.error());
         return status_of(IntervalNotifier::watch_source(*src, accept));
       }},
      {"HostSegmentsAndInvalidateHost",
       [](World& w) {
         ASSERT_OK(w.a->map(w.file(0, kMiB), kRW, 0x100000));
         ASSERT_OK(w.a->map(w.file(2 * kMiB, kMiB), kRW, 0x200000));
       },
       [](World& w) {
         auto segs = w.a->host_segments(0x100000, 2 * kMiB, kProtRead);
         if (!segs.ok()) return Status(segs.error());
         return status_of(w.a->invalidate_host(0x100000, 2 * kMiB));
       }},
      {"MapOnDemandWithDomain", [](World& w) { w.attach_domains(1); },
       [](World& w) {
         auto src = MemorySource::from_file(w.mfd.fd(), 0, 2 * kMiB);
         if (!src.ok()) return Status(src.error());
         return status_of(w.a->map_on_demand(*src, kRW, 0x200000));
       }},
      {"AllowedAndReservedRanges", [](World&) {},
       [](World& w) {
         const IovaRange allowed[] = {{0x10000000, 0x1FFFFFFF}};
         if (Status s = w.a->set_allowed_ranges(allowed); !s) return s;
         return w.a->add_reserved({0x1000, 0x1FFF});
       }},
  };
  return list;
}

struct RunSummary {
  int runs = 0;
  bool reached_clean_run = false;
  std::map<std::string, std::string> failed_sites;  // site -> name
};

// Fail each site in turn until a run reaches none; return what was
// exercised. W is the world type, snap(W&) its observable state.
template <typename W, typename Snap>
RunSummary run_fail_nth(const BasicScenario<W>& sc, Snap snap) {
  test::WithoutIpcLock nocap;  // charging on: the acct.charge site is reached
  EXPECT_TRUE(set_memlock_limit(AccountMode::per_process, 0, 64 * kMiB).ok());
  decltype(snap(std::declval<W&>())) reference{};
  {
    W w;
    sc.setup(w);
    const Status clean = sc.op(w);
    EXPECT_TRUE(clean.ok()) << sc.name << " must succeed without injection: "
                            << (clean.ok() ? "" : clean.error().describe());
    reference = snap(w);
  }
  RunSummary summary;
  constexpr uint64_t kMaxRuns = 1000;
  for (uint64_t n = 1; n <= kMaxRuns; ++n) {
    W w;
    sc.setup(w);
    const auto before = snap(w);
    fault::fail_nth(n);
    const Status st = sc.op(w);
    const fault::Report report = fault::disarm();
    ++summary.runs;
    if (report.failed_site.empty()) {
      summary.reached_clean_run = true;
      EXPECT_TRUE(st.ok()) << sc.name << ": a run with no injected failure failed";
      EXPECT_TRUE(snap(w) == reference) << sc.name << ": clean run differs";
      break;
    }
    summary.failed_sites.emplace(report.failed_site, report.failed_name);
    const auto after = snap(w);
    if (!st.ok()) {
      EXPECT_TRUE(after == before)
          << sc.name << ": failing site " << n << " (" << report.failed_name << " at "
          << report.failed_site << ", " << st.error().describe() << ") changed the state";
    } else {
      EXPECT_TRUE(after == reference)
          << sc.name << ": recovered from site " << n << " (" << report.failed_name << " at "
          << report.failed_site << ") into a different state";
    }
  }
  EXPECT_TRUE(summary.reached_clean_run)
      << sc.name << ": still failing an injected site after " << kMaxRuns << " runs";
  const Counters c = counters();
  EXPECT_EQ(c.pinned_bytes + c.simulated_pinned_bytes, 0U) << sc.name;
  EXPECT_EQ(c.charged_bytes, 0U) << sc.name;
  EXPECT_EQ(c.vmlck_bytes, 0U) << sc.name;
  return summary;
}

void print_summary(const char* name, const RunSummary& s) {
  std::cout << "[fail_nth] " << name << ": " << s.runs << " runs, sites:";
  for (const auto& [site, point] : s.failed_sites) std::cout << " " << point << "@" << site;
  std::cout << "\n";
}

// --- The type1 interface --------------------------------------------------

// A container over this process's memory: a memfd mapped shared (so MAP_DMA
// resolves it to the file) and anonymous memory.
struct VfioWorld {
  test::Memfd mfd{4 * kMiB};
  std::byte* file_map = static_cast<std::byte*>(
      mmap(nullptr, 4 * kMiB, PROT_READ | PROT_WRITE, MAP_SHARED, mfd.fd(), 0));
  std::byte* anon = static_cast<std::byte*>(
      mmap(nullptr, kMiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  iomm_vfio_container* c = iomm_vfio_open();
  iomm_vfio_group* sw = nullptr;
  iomm_vfio_group* md = nullptr;
  std::mutex pins_mu;
  std::vector<std::pair<uint64_t, int>> pins;  // mediated pins: iova, npage

  VfioWorld() = default;
  VfioWorld(const VfioWorld&) = delete;
  VfioWorld& operator=(const VfioWorld&) = delete;
  ~VfioWorld() {
    // Closing a container detaches its groups; destroying them is ours.
    if (md != nullptr) iomm_vfio_group_destroy(md);
    if (sw != nullptr) iomm_vfio_group_destroy(sw);
    iomm_vfio_close(c);
    munmap(file_map, 4 * kMiB);
    munmap(anon, kMiB);
  }

  static void on_unmap(void* opaque, uint64_t iova, uint64_t size) {
    auto* w = static_cast<VfioWorld*>(opaque);
    std::lock_guard lk(w->pins_mu);
    std::erase_if(w->pins, [&](const auto& p) {
      const uint64_t last = p.first + static_cast<uint64_t>(p.second) * kPageSize - 1;
      if (last < iova || p.first > iova + size - 1) return false;
      EXPECT_EQ(iomm_vfio_unpin_pages(w->md, p.first, p.second), p.second);
      return true;
    });
  }
  void groups(bool software, bool mediated) {
    if (software) {
      ASSERT_NE(sw = iomm_vfio_group_create_software(c, nullptr), nullptr);
    }
    if (mediated) {
      ASSERT_NE(md = iomm_vfio_group_create_mediated(c, on_unmap, this), nullptr);
    }
    ASSERT_EQ(iomm_vfio_ioctl(c, VFIO_SET_IOMMU, reinterpret_cast<void*>(VFIO_TYPE1v2_IOMMU)), 0);
  }
  long map(uint64_t iova, void* vaddr, uint64_t size, uint32_t flags) {
    vfio_iommu_type1_dma_map m{};
    m.argsz = sizeof(m);
    m.flags = flags;
    m.vaddr = reinterpret_cast<uint64_t>(vaddr);
    m.iova = iova;
    m.size = size;
    return iomm_vfio_ioctl(c, VFIO_IOMMU_MAP_DMA, &m);
  }
  long unmap(uint64_t iova, uint64_t size, uint32_t flags) {
    vfio_iommu_type1_dma_unmap u{};
    u.argsz = sizeof(u);
    u.flags = flags;
    u.iova = iova;
    u.size = size;
    return iomm_vfio_ioctl(c, VFIO_IOMMU_UNMAP_DMA, &u);
  }
  long get_bitmap(uint64_t iova, uint64_t size, std::vector<uint64_t>& bits) {
    alignas(8) unsigned char
        buf[sizeof(vfio_iommu_type1_dirty_bitmap) + sizeof(vfio_iommu_type1_dirty_bitmap_get)] = {};
    auto* d = reinterpret_cast<vfio_iommu_type1_dirty_bitmap*>(buf);
    auto* get = reinterpret_cast<vfio_iommu_type1_dirty_bitmap_get*>(d->data);
    d->argsz = sizeof(buf);
    d->flags = VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP;
    get->iova = iova;
    get->size = size;
    get->bitmap.pgsize = kPageSize;
    get->bitmap.size = bits.size() * sizeof(uint64_t);
    get->bitmap.data = reinterpret_cast<__u64*>(bits.data());
    return iomm_vfio_ioctl(c, VFIO_IOMMU_DIRTY_PAGES, d);
  }
  long dirty(uint32_t flags) {
    vfio_iommu_type1_dirty_bitmap d{};
    d.argsz = sizeof(d);
    d.flags = flags;
    return iomm_vfio_ioctl(c, VFIO_IOMMU_DIRTY_PAGES, &d);
  }
};

constexpr uint32_t kMapRW = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;

Status errno_status(long rc) {
  if (rc >= 0) return {};
  return Error(errno, "type1 call failed");
}

using VfioScenario = BasicScenario<VfioWorld>;

// What a type1 user can observe: counts, DMA_AVAIL, which IOVAs a device
// reaches through the software group.
struct VfioSnapshot {
  uint64_t pinned = 0, charged = 0, vmlck = 0;
  uint32_t dma_avail = 0;
  std::vector<bool> reachable;
  size_t mediated_pins = 0;  // the driver's pins, which unmap notifications drop
  // GET_BITMAP of [0x400000, +2 MiB): its result and the bits.
  long bitmap_rc = 0;
  int bitmap_errno = 0;
  std::vector<uint64_t> dirty;
  bool operator==(const VfioSnapshot&) const = default;
};

VfioSnapshot vfio_snapshot(VfioWorld& w) {
  VfioSnapshot s;
  const Counters c = counters();
  s.pinned = c.pinned_bytes;
  s.charged = c.charged_bytes;
  s.vmlck = c.vmlck_bytes;
  alignas(8) unsigned char buf[512] = {};
  auto* info = reinterpret_cast<vfio_iommu_type1_info*>(buf);
  info->argsz = sizeof(buf);
  if (iomm_vfio_ioctl(w.c, VFIO_IOMMU_GET_INFO, info) == 0 && info->cap_offset != 0) {
    for (uint32_t off = info->cap_offset; off != 0 && off < sizeof(buf);) {
      auto* h = reinterpret_cast<vfio_info_cap_header*>(buf + off);
      if (h->id == VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL) {
        s.dma_avail = reinterpret_cast<vfio_iommu_type1_info_dma_avail*>(h)->avail;
      }
      off = h->next;
    }
  }
  s.mediated_pins = w.pins.size();
  s.dirty.assign(8, 0);
  s.bitmap_rc = w.get_bitmap(0x400000, 2 * kMiB, s.dirty);
  s.bitmap_errno = s.bitmap_rc == 0 ? 0 : errno;
  // GET_BITMAP cleared the bits: the device writes each page back as it was,
  // which marks it again, so that looking does not change the log.
  for (size_t i = 0; i < s.dirty.size() * 64; ++i) {
    if ((s.dirty[i / 64] >> (i % 64) & 1) == 0) continue;
    const uint64_t iova = 0x400000 + i * kPageSize;
    char byte = 0;
    auto rw = [&](int write) {
      return w.sw != nullptr ? iomm_vfio_group_dma_rw(w.sw, iova, &byte, 1, write)
                             : iomm_vfio_dma_rw(w.md, iova, &byte, 1, write);
    };
    EXPECT_EQ(rw(0), 0);
    EXPECT_EQ(rw(1), 0);
  }
  if (w.sw != nullptr) {
    for (uint64_t iova : {0x100000ULL, 0x1FF000ULL, 0x400000ULL, 0x5FF000ULL, 0x800000ULL}) {
      char byte = 0;
      s.reachable.push_back(iomm_vfio_group_dma_rw(w.sw, iova, &byte, 1, 0) == 0);
    }
  }
  return s;
}

const std::vector<VfioScenario>& vfio_scenarios() {
  static const std::vector<VfioScenario> list = {
      {"VfioOpen", [](VfioWorld&) {},
       [](VfioWorld&) {
         iomm_vfio_container* c = iomm_vfio_open();
         if (c == nullptr) return Status(Error(errno, "iomm_vfio_open"));
         iomm_vfio_close(c);
         return Status();
       }},
      {"VfioCreateSoftwareGroup", [](VfioWorld&) {},
       [](VfioWorld& w) {
         w.sw = iomm_vfio_group_create_software(w.c, nullptr);
         return w.sw != nullptr ? Status() : Status(Error(errno, "group"));
       }},
      {"VfioMapAnonymous", [](VfioWorld& w) { w.groups(true, false); },
       [](VfioWorld& w) { return errno_status(w.map(0x100000, w.anon, kMiB, kMapRW)); }},
      {"VfioMapMemfd", [](VfioWorld& w) { w.groups(true, false); },
       [](VfioWorld& w) { return errno_status(w.map(0x400000, w.file_map, 2 * kMiB, kMapRW)); }},
      {"VfioAttachReplays",
       [](VfioWorld& w) {
         w.groups(false, true);
         ASSERT_EQ(w.map(0x100000, w.anon, kMiB, kMapRW), 0);
         ASSERT_EQ(w.map(0x400000, w.file_map, 2 * kMiB, kMapRW), 0);
       },
       [](VfioWorld& w) {
         w.sw = iomm_vfio_group_create_software(w.c, nullptr);
         return w.sw != nullptr ? Status() : Status(Error(errno, "group"));
       }},
      {"VfioMediatedPin",
       [](VfioWorld& w) {
         w.groups(false, true);
         ASSERT_EQ(w.map(0x400000, w.file_map, 2 * kMiB, kMapRW), 0);
       },
       [](VfioWorld& w) {
         void* host[8];
         std::lock_guard lk(w.pins_mu);
         const int n = iomm_vfio_pin_pages(w.md, 0x400000, 8, IOMM_VFIO_PROT_WRITE, host);
         if (n < 0) return Status(Error(errno, "pin_pages"));
         w.pins.emplace_back(0x400000, 8);
         return Status();
       }},
      // A fresh pin coalesced into three pin store calls (two runs of the
      // file mapping around a page already pinned, one of the anonymous
      // mapping next to it): a failure in a later run undoes the earlier
      // ones, and the page already pinned keeps its single count.
      {"VfioMediatedPinAcrossRuns",
       [](VfioWorld& w) {
         w.groups(false, true);
         ASSERT_EQ(w.map(0x400000, w.file_map, 2 * kMiB, kMapRW), 0);
         ASSERT_EQ(w.map(0x600000, w.anon, kMiB, kMapRW), 0);
         void* host = nullptr;
         ASSERT_EQ(iomm_vfio_pin_pages(w.md, 0x5FD000, 1, IOMM_VFIO_PROT_WRITE, &host), 1);
         w.pins.emplace_back(0x5FD000, 1);
       },
       [](VfioWorld& w) {
         void* host[8];
         std::lock_guard lk(w.pins_mu);
         const int n = iomm_vfio_pin_pages(w.md, 0x5FB000, 8, IOMM_VFIO_PROT_WRITE, host);
         if (n < 0) return Status(Error(errno, "pin_pages"));
         w.pins.emplace_back(0x5FB000, 8);
         return Status();
       }},
      {"VfioMediatedRw",
       [](VfioWorld& w) {
         w.groups(false, true);
         ASSERT_EQ(w.map(0x400000, w.file_map, 2 * kMiB, kMapRW), 0);
         ASSERT_EQ(w.dirty(VFIO_IOMMU_DIRTY_PAGES_FLAG_START), 0);
       },
       [](VfioWorld& w) {
         char buf[64] = {7};
         return iomm_vfio_dma_rw(w.md, 0x400100, buf, sizeof(buf), 1) == 0
                    ? Status()
                    : Status(Error(errno, "dma_rw"));
       }},
      {"VfioDeviceDmaWithDirtyTracking",
       [](VfioWorld& w) {
         w.groups(true, false);
         ASSERT_EQ(w.map(0x400000, w.file_map, 2 * kMiB, kMapRW), 0);
         ASSERT_EQ(w.dirty(VFIO_IOMMU_DIRTY_PAGES_FLAG_START), 0);
       },
       [](VfioWorld& w) {
         char buf[64] = {7};
         return iomm_vfio_group_dma_rw(w.sw, 0x5FF000, buf, sizeof(buf), 1) == 0
                    ? Status()
                    : Status(Error(errno, "group_dma_rw"));
       }},
      {"VfioGetDirtyBitmap",
       [](VfioWorld& w) {
         w.groups(true, false);
         ASSERT_EQ(w.map(0x400000, w.file_map, 2 * kMiB, kMapRW), 0);
         ASSERT_EQ(w.dirty(VFIO_IOMMU_DIRTY_PAGES_FLAG_START), 0);
       },
       [](VfioWorld& w) {
         std::vector<uint64_t> bits(8);
         return errno_status(w.get_bitmap(0x400000, 2 * kMiB, bits));
       }},
      {"VfioUnmapWithDirtyBitmap",
       [](VfioWorld& w) {
         w.groups(true, false);
         ASSERT_EQ(w.map(0x400000, w.file_map, 2 * kMiB, kMapRW), 0);
         ASSERT_EQ(w.dirty(VFIO_IOMMU_DIRTY_PAGES_FLAG_START), 0);
         char byte = 1;
         ASSERT_EQ(iomm_vfio_group_dma_rw(w.sw, 0x401000, &byte, 1, 1), 0);
       },
       [](VfioWorld& w) {
         uint64_t bits[8] = {};
         alignas(
             8) unsigned char buf[sizeof(vfio_iommu_type1_dma_unmap) + sizeof(vfio_bitmap)] = {};
         auto* u = reinterpret_cast<vfio_iommu_type1_dma_unmap*>(buf);
         auto* bitmap = reinterpret_cast<vfio_bitmap*>(u->data);
         u->argsz = sizeof(buf);
         u->flags = VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP;
         u->iova = 0x400000;
         u->size = 2 * kMiB;
         bitmap->pgsize = kPageSize;
         bitmap->size = sizeof(bits);
         bitmap->data = reinterpret_cast<__u64*>(bits);
         if (iomm_vfio_ioctl(w.c, VFIO_IOMMU_UNMAP_DMA, u) != 0) return errno_status(-1);
         // The page the device wrote, and only it.
         return bits[0] == 2 && bits[1] == 0 ? Status() : Status(Error(EIO, "wrong dirty bits"));
       }},
      {"VfioCreateMediatedGroup", [](VfioWorld&) {},
       [](VfioWorld& w) {
         w.md = iomm_vfio_group_create_mediated(w.c, VfioWorld::on_unmap, &w);
         return w.md != nullptr ? Status() : Status(Error(errno, "mediated group"));
       }},
      {"VfioGetInfo",
       [](VfioWorld& w) {
         w.groups(true, false);
         ASSERT_EQ(w.map(0x400000, w.file_map, 2 * kMiB, kMapRW), 0);
       },
       [](VfioWorld& w) {
         alignas(8) unsigned char buf[512] = {};
         auto* info = reinterpret_cast<vfio_iommu_type1_info*>(buf);
         info->argsz = sizeof(buf);
         return errno_status(iomm_vfio_ioctl(w.c, VFIO_IOMMU_GET_INFO, info));
       }},
      {"VfioUnmapNotifiesMediated",
       [](VfioWorld& w) {
         w.groups(true, true);
         ASSERT_EQ(w.map(0x400000, w.file_map, 2 * kMiB, kMapRW), 0);
         void* host[4];
         ASSERT_EQ(iomm_vfio_pin_pages(w.md, 0x400000, 4, IOMM_VFIO_PROT_READ, host), 4);
         w.pins.emplace_back(0x400000, 4);
       },
       [](VfioWorld& w) { return errno_status(w.unmap(0x400000, 2 * kMiB, 0)); }},
      {"VfioVaddrUpdate",
       [](VfioWorld& w) {
         w.groups(true, false);
         // Invalidating a file vaddr needs the library's own mapping of the
         // file, which an unprivileged process gets from a registered fd.
         ASSERT_EQ(iomm_vfio_register_fd(w.c, w.mfd.fd()), 0);
         ASSERT_EQ(w.map(0x400000, w.file_map, 2 * kMiB, kMapRW), 0);
         ASSERT_EQ(w.unmap(0x400000, 2 * kMiB, VFIO_DMA_UNMAP_FLAG_VADDR), 0);
       },
       [](VfioWorld& w) {
         // A second mapping of the same file: the same memory object.
         void* again = mmap(nullptr, 2 * kMiB, PROT_READ | PROT_WRITE, MAP_SHARED, w.mfd.fd(), 0);
         const Status st = errno_status(w.map(0x400000, again, 2 * kMiB, VFIO_DMA_MAP_FLAG_VADDR));
         munmap(again, 2 * kMiB);
         return st;
       }},
  };
  return list;
}

class FaultInjectionVfio : public testing::TestWithParam<size_t> {};

TEST_P(FaultInjectionVfio, EveryFailureLeavesNoTrace) {
  const VfioScenario& sc = vfio_scenarios()[GetParam()];
  print_summary(sc.name, run_fail_nth(sc, vfio_snapshot));
}

class FaultInjection : public testing::TestWithParam<size_t> {};

TEST_P(FaultInjection, EveryFailureLeavesNoTrace) {
  const Scenario& sc = scenarios()[GetParam()];
  print_summary(sc.name, run_fail_nth(sc, snapshot));
}

INSTANTIATE_TEST_SUITE_P(Scenarios, FaultInjection, testing::Range<size_t>(0, 23),
                         [](const testing::TestParamInfo<size_t>& param) {
                           return std::string(scenarios()[param.param].name);
                         });

INSTANTIATE_TEST_SUITE_P(Scenarios, FaultInjectionVfio, testing::Range<size_t>(0, 15),
                         [](const testing::TestParamInfo<size_t>& param) {
                           return std::string(vfio_scenarios()[param.param].name);
                         });

TEST(FaultInjectionCoverage, ScenarioListIsComplete) {
  EXPECT_EQ(scenarios().size(), 23U) << "update the Range in INSTANTIATE_TEST_SUITE_P";
  EXPECT_EQ(vfio_scenarios().size(), 15U) << "update the Range in INSTANTIATE_TEST_SUITE_P";
}

TEST(FaultInjectionCoverage, EverySiteIsFailed) {
  std::map<std::string, std::string> seen;  // site -> name
  for (const Scenario& sc : scenarios()) seen.merge(run_fail_nth(sc, snapshot).failed_sites);
  for (const VfioScenario& sc : vfio_scenarios()) {
    seen.merge(run_fail_nth(sc, vfio_snapshot).failed_sites);
  }
  std::map<std::string, std::string> listed;
  for (const Site& s : kSites) listed.emplace(s.site, s.name);
  for (const auto& [site, name] : listed) {
    EXPECT_TRUE(seen.count(site)) << "no scenario fails the site IOMM_INJECT(\"" << name
                                  << "\") at " << site
                                  << ": add one to tests/fault_injection_test.cpp that reaches it";
  }
  for (const auto& [site, name] : seen) {
    ASSERT_TRUE(listed.count(site)) << "IOMM_INJECT(\"" << name << "\") failed at " << site
                                    << ", which the build's list of sites lacks (stale build?)";
    EXPECT_EQ(listed[site], name) << "the site " << site << " is named differently in src/";
  }
}

}  // namespace
}  // namespace iomm
