// Fault injection (issue 4; iommufd's fail_nth in user space): each scenario
// is run failing the 1st, 2nd, ... injection point it reaches, until a run
// reaches no point. After each run:
// - a call that failed left the state exactly as before the call
//   (mappings, translations, pins, charges, VmLck, accesses, reservations);
// - a call that recovered (e.g. an unmap retrying after a callback that did
//   not unpin) left the same state as a run with no injection;
// - tearing the world down returns every count to zero; LeakSanitizer (ASan
//   preset) checks that nothing leaked.
// Adding a scenario is one entry in kScenarios; adding a point is one
// IOMM_INJECT in src/ and one name in kAllPoints (and docs/testing.md).
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <functional>
#include <iostream>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "fault/fail_nth.hpp"
#include "iomm/access.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

constexpr uint32_t kRW = kProtRead | kProtWrite;
constexpr uint64_t kMiB = 1 << 20;

// Every injection point in src/. EveryPointIsExercised keeps this list and
// the scenarios honest.
const std::set<std::string> kAllPoints = {
    "acct.charge",
    "access.alloc",
    "access.alloc_pin_record",
    "access.alloc_slices",
    "access.callback",
    "domain.alloc",
    "domain.table_alloc",
    "ioas.alloc_allowed",
    "ioas.alloc_area",
    "ioas.alloc_copy",
    "ioas.alloc_domain_slot",
    "ioas.alloc_reservation",
    "mem.alloc_object",
    "mem.dup",
    "mem.fstat",
    "mem.madvise",
    "mem.mincore",
    "mem.mlock",
    "mem.mmap",
    "mem.pin_bookkeeping",
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
  std::vector<std::tuple<uint64_t, uint64_t, uint64_t, uint64_t>> domain_tables;
  uint64_t pinned = 0, charged = 0, vmlck = 0, access_pins = 0;
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
  for (const auto& d : w.domains) {
    const DomainCounters c = d->counters();
    s.domain_tables.emplace_back(c.mapped_bytes, c.leaves_4k, c.leaves_2m, c.leaves_1g);
  }
  const DomainCounters sc = w.spare->counters();
  s.domain_tables.emplace_back(sc.mapped_bytes, sc.leaves_4k, sc.leaves_2m, sc.leaves_1g);
  const Counters c = counters();
  s.pinned = c.pinned_bytes + c.simulated_pinned_bytes;
  s.charged = c.charged_bytes;
  s.vmlck = c.vmlck_bytes;
  s.access_pins = w.access ? w.access->pin_count() : 0;
  // Whether the spare domain is free: attaching it to a scratch IOAS works.
  auto scratch = Ioas::create({}).value();
  s.spare_attached_elsewhere_ok = scratch->attach(w.spare).ok();
  if (s.spare_attached_elsewhere_ok) {
    EXPECT_TRUE(scratch->detach(w.spare).ok());
  }
  return s;
}

struct Scenario {
  const char* name;
  std::function<void(World&)> setup;
  std::function<Status(World&)> op;
};

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
      {"UnmapTwoDomains",
       [](World& w) {
         w.attach_domains(2);
         ASSERT_OK(w.a->map(w.file(0, kMiB), kRW, 0x100000));
         ASSERT_OK(w.a->map(w.file(kMiB, kMiB), kRW, 0x300000));
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
      {"AccessReadWrite",
       [](World& w) {
         ASSERT_OK(w.a->map(w.file(0, kMiB), kRW, 0x100000));
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
  std::set<std::string> failed_points;
};

// Fail each point in turn; return what was exercised.
RunSummary run_fail_nth(const Scenario& sc) {
  test::WithoutIpcLock nocap;  // charging on: the acct.charge point is reached
  EXPECT_TRUE(set_memlock_limit(AccountMode::per_process, 0, 64 * kMiB).ok());
  Snapshot reference;
  {
    World w;
    sc.setup(w);
    const Status clean = sc.op(w);
    EXPECT_TRUE(clean.ok()) << sc.name << " must succeed without injection: "
                            << (clean.ok() ? "" : clean.error().describe());
    reference = snapshot(w);
  }
  RunSummary summary;
  for (uint64_t n = 1; n < 1000; ++n) {
    World w;
    sc.setup(w);
    const Snapshot before = snapshot(w);
    fault::fail_nth(n);
    const Status st = sc.op(w);
    const fault::Report report = fault::disarm();
    ++summary.runs;
    if (report.failed_point.empty()) {
      EXPECT_TRUE(st.ok()) << sc.name << ": a run with no injected failure failed";
      EXPECT_TRUE(snapshot(w) == reference) << sc.name << ": clean run differs";
      break;
    }
    summary.failed_points.insert(report.failed_point);
    const Snapshot after = snapshot(w);
    if (!st.ok()) {
      EXPECT_TRUE(after == before)
          << sc.name << ": failing point " << n << " (" << report.failed_point << ", "
          << st.error().describe() << ") changed the state";
    } else {
      EXPECT_TRUE(after == reference) << sc.name << ": recovered from point " << n << " ("
                                      << report.failed_point << ") into a different state";
    }
  }
  const Counters c = counters();
  EXPECT_EQ(c.pinned_bytes + c.simulated_pinned_bytes, 0U) << sc.name;
  EXPECT_EQ(c.charged_bytes, 0U) << sc.name;
  EXPECT_EQ(c.vmlck_bytes, 0U) << sc.name;
  return summary;
}

class FaultInjection : public testing::TestWithParam<size_t> {};

TEST_P(FaultInjection, EveryFailureLeavesNoTrace) {
  const Scenario& sc = scenarios()[GetParam()];
  const RunSummary s = run_fail_nth(sc);
  std::cout << "[fail_nth] " << sc.name << ": " << s.runs << " runs, points:";
  for (const auto& p : s.failed_points) std::cout << " " << p;
  std::cout << "\n";
}

INSTANTIATE_TEST_SUITE_P(Scenarios, FaultInjection, testing::Range<size_t>(0, 18),
                         [](const testing::TestParamInfo<size_t>& param) {
                           return std::string(scenarios()[param.param].name);
                         });

TEST(FaultInjectionCoverage, ScenarioListIsComplete) {
  EXPECT_EQ(scenarios().size(), 18U) << "update the Range in INSTANTIATE_TEST_SUITE_P";
}

TEST(FaultInjectionCoverage, EveryPointIsExercised) {
  std::set<std::string> seen;
  for (const Scenario& sc : scenarios()) {
    const RunSummary s = run_fail_nth(sc);
    seen.insert(s.failed_points.begin(), s.failed_points.end());
  }
  for (const std::string& p : kAllPoints) EXPECT_TRUE(seen.count(p)) << "never failed: " << p;
  for (const std::string& p : seen) EXPECT_TRUE(kAllPoints.count(p)) << "not listed: " << p;
}

}  // namespace
}  // namespace iomm
