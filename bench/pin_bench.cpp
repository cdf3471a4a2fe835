// Pinning throughput: iomm vs raw mlock/munlock of the same memfd.
//
// What is timed, and why this path
// - iomm: an Access pin() + unpin() of the whole 1 GiB mapping. That is the
//   most direct route into the pin store (MemObject::pin/unpin: bookkeeping,
//   charge, MADV_POPULATE_WRITE + mlock, then munlock + uncharge) with no
//   page-table fill and no RCU grace period in the way. Ioas::attach/detach
//   also pins, but adds a page-table fill (one 1 GiB leaf for either memfd:
//   the library's window keeps the file's 1 GiB alignment) and an RCU grace
//   period per detach; it is reported too, as "iomm_attach_detach".
//   Map-with-a-domain-attached would add IOVA allocation and area bookkeeping.
// - baseline: mlock() + munlock() of the same 1 GiB of the same memfd through
//   a MAP_SHARED|MAP_POPULATE mapping of our own.
// - Both sides time a full, symmetric pin + unpin cycle (no PauseTiming).
// - Pre-populated: the baseline mapping is MAP_POPULATE'd; the library maps
//   the file itself (its own VMA), so one untimed pin/unpin warms its page
//   tables (munlock leaves the PTEs in place). Every timed cycle therefore
//   finds every page resident and mapped on both sides.
// - "iomm_attach_detach_prepinned" is a breakdown row: attach+detach while
//   an Access pin holds the range, i.e. attach+detach without its pin.
// - "mlock_populate" is a breakdown baseline: the exact syscalls iomm issues
//   (madvise(MADV_POPULATE_WRITE) + mlock + munlock) with no library code,
//   to separate library overhead from the cost of the populate pass.
// - Charged variant ("iomm_access_charged"): CAP_IPC_LOCK is dropped from the
//   thread's effective set while the IOAS maps (iomm captures the charge
//   decision at map time), so the mapping's owner is this process and every
//   pin is charged (compare-and-swap) against the limit configured with
//   iomm::set_memlock_limit(per_process, 0, 4 GiB); the setup checks that
//   1 GiB really got charged. The capability is back on for the timed loop,
//   because the kernel's own RLIMIT_MEMLOCK (8 MiB hard limit here, and no
//   CAP_SYS_RESOURCE to raise it) would otherwise refuse the 1 GiB mlock;
//   the kernel's rlimit check is a trivial comparison either way. Compare it
//   with the plain "mlock" baseline.
// Sizes: 4 KiB pages (plain memfd) and 2 MiB pages (MFD_HUGETLB; needs 512
// free huge pages, raised via /proc/sys/vm/nr_hugepages when root, else the
// hugetlb benchmarks are skipped with an error).
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <string>

#include "bench_util.hpp"
#include "iomm/access.hpp"
#include "iomm/accounting.hpp"
#include "iomm/domain.hpp"
#include "iomm/ioas.hpp"
#include "iomm/source.hpp"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

using namespace iomm_bench;

namespace {

constexpr uint64_t kLength = 1 * GiB;
constexpr uint32_t kRW = iomm::kProtRead | iomm::kProtWrite;

struct PinFixture {
  bool huge = false;
  std::string error;  // non-empty: setup failed, benchmarks skip with it
  int fd = -1;
  void* raw = nullptr;  // baseline mapping of the same memfd
  std::shared_ptr<iomm::Ioas> ioas;
  std::shared_ptr<iomm::Access> access;
  uint64_t iova = 0;
  std::shared_ptr<iomm::SoftDomain> domain;
  // Charged path: mapped while CAP_IPC_LOCK was off.
  std::string charged_error;
  std::shared_ptr<iomm::Ioas> ioas_charged;
  std::shared_ptr<iomm::Access> access_charged;
  uint64_t iova_charged = 0;
  uint64_t charged_bytes_seen = 0;

  ~PinFixture() {
    access.reset();
    access_charged.reset();
    ioas.reset();
    ioas_charged.reset();
    domain.reset();
    if (raw != nullptr) munmap(raw, kLength);
    if (fd >= 0) close(fd);
  }
};

void no_unmap(const iomm::IovaRange&) {}

bool setup_charged(PinFixture& f, const iomm::MemorySource& src) {
  if (auto s = iomm::set_memlock_limit(iomm::AccountMode::per_process, 0, 4 * GiB); !s) {
    f.charged_error = describe("set_memlock_limit", s.error());
    return false;
  }
  iomm::IoasOptions opt;
  opt.account_mode = iomm::AccountMode::per_process;
  auto ioas = iomm::Ioas::create(opt);
  if (!ioas) {
    f.charged_error = describe("Ioas::create (charged)", ioas.error());
    return false;
  }
  f.ioas_charged = *ioas;
  {
    // The charge decision is captured at map time (accounting.hpp), so the
    // capability only needs to be off for the map.
    WithoutIpcLock nocap;
    if (!nocap.ok()) {
      f.charged_error = "capset: cannot drop CAP_IPC_LOCK";
      return false;
    }
    auto iova = f.ioas_charged->map(src, kRW);
    if (!iova) {
      f.charged_error = describe("Ioas::map (charged)", iova.error());
      return false;
    }
    f.iova_charged = *iova;
  }
  auto acc = iomm::Access::create(f.ioas_charged, no_unmap);
  if (!acc) {
    f.charged_error = describe("Access::create (charged)", acc.error());
    return false;
  }
  f.access_charged = *acc;
  // Warm-up cycle (untimed), and check the charge is really taken.
  auto pin = f.access_charged->pin(f.iova_charged, kLength, kRW);
  if (!pin) {
    f.charged_error = describe("Access::pin (charged warm-up)", pin.error());
    return false;
  }
  f.charged_bytes_seen = iomm::counters().charged_bytes;
  if (auto s = f.access_charged->unpin(f.iova_charged, kLength); !s) {
    f.charged_error = describe("Access::unpin (charged warm-up)", s.error());
    return false;
  }
  if (f.charged_bytes_seen < kLength) {
    f.charged_error =
        "charging did not happen: charged_bytes=" + std::to_string(f.charged_bytes_seen) +
        " after pinning 1 GiB with CAP_IPC_LOCK dropped";
    return false;
  }
  return true;
}

std::unique_ptr<PinFixture> make_fixture(bool huge) {
  auto f = std::make_unique<PinFixture>();
  f->huge = huge;
  if (huge) {
    std::string why;
    if (!ensure_free_hugepages(static_cast<long>(kLength / (2 * MiB)), &why)) {
      f->error = "hugetlb unavailable: " + why;
      f->charged_error = f->error;
      return f;
    }
  }
  f->fd = memfd_create(huge ? "iomm-bench-pin-2m" : "iomm-bench-pin-4k",
                       MFD_CLOEXEC | MFD_ALLOW_SEALING | (huge ? MFD_HUGETLB : 0U));
  if (f->fd < 0) {
    f->error = std::string("memfd_create: ") + std::strerror(errno);
    f->charged_error = f->error;
    return f;
  }
  if (ftruncate(f->fd, static_cast<off_t>(kLength)) != 0 ||
      fcntl(f->fd, F_ADD_SEALS, F_SEAL_SHRINK) != 0) {
    f->error = std::string("ftruncate/F_ADD_SEALS: ") + std::strerror(errno);
    f->charged_error = f->error;
    return f;
  }
  f->raw = mmap(nullptr, kLength, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, f->fd, 0);
  if (f->raw == MAP_FAILED) {
    f->raw = nullptr;
    f->error = std::string("mmap(MAP_POPULATE): ") + std::strerror(errno);
    f->charged_error = f->error;
    return f;
  }
  // Touch every page for write so the page cache holds it and the baseline
  // PTEs are writable (MAP_POPULATE on a shared mapping maps for write
  // already; this makes it explicit).
  const uint64_t step = huge ? 2 * MiB : 4 * KiB;
  for (uint64_t off = 0; off < kLength; off += step) static_cast<volatile char*>(f->raw)[off] = 1;

  auto src = iomm::MemorySource::from_file(f->fd, 0, kLength);
  if (!src) {
    f->error = describe("MemorySource::from_file", src.error());
    f->charged_error = f->error;
    return f;
  }
  auto ioas = iomm::Ioas::create();
  if (!ioas) {
    f->error = describe("Ioas::create", ioas.error());
    return f;
  }
  f->ioas = *ioas;
  auto iova = f->ioas->map(*src, kRW);
  if (!iova) {
    f->error = describe("Ioas::map", iova.error());
    return f;
  }
  f->iova = *iova;
  auto acc = iomm::Access::create(f->ioas, no_unmap);
  if (!acc) {
    f->error = describe("Access::create", acc.error());
    return f;
  }
  f->access = *acc;
  auto dom = iomm::SoftDomain::create({});
  if (!dom) {
    f->error = describe("SoftDomain::create", dom.error());
    return f;
  }
  f->domain = *dom;
  // Warm-up (untimed): populates the library's own PTEs.
  auto pin = f->access->pin(f->iova, kLength, kRW);
  if (!pin) {
    f->error = describe("Access::pin (warm-up)", pin.error());
    return f;
  }
  if (auto s = f->access->unpin(f->iova, kLength); !s) {
    f->error = describe("Access::unpin (warm-up)", s.error());
    return f;
  }
  setup_charged(*f, *src);
  return f;
}

std::unique_ptr<PinFixture> g_f4k;
std::unique_ptr<PinFixture> g_f2m;

PinFixture& fixture(bool huge) {
  auto& f = huge ? g_f2m : g_f4k;
  if (!f) f = make_fixture(huge);
  return *f;
}

void finish(benchmark::State& state) {
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(kLength));
}

// ---- baselines ------------------------------------------------------------

void run_mlock(benchmark::State& state, bool huge, bool populate_too) {
  PinFixture& f = fixture(huge);
  if (f.raw == nullptr) return fail(state, f.error);
  for (auto _ : state) {
    if (populate_too && madvise(f.raw, kLength, MADV_POPULATE_WRITE) != 0) {
      return fail(state, std::string("madvise(MADV_POPULATE_WRITE): ") + std::strerror(errno));
    }
    if (mlock(f.raw, kLength) != 0)
      return fail(state, std::string("mlock: ") + std::strerror(errno));
    if (munlock(f.raw, kLength) != 0)
      return fail(state, std::string("munlock: ") + std::strerror(errno));
  }
  finish(state);
}

void BM_mlock(benchmark::State& state, bool huge) { run_mlock(state, huge, false); }
void BM_mlock_populate(benchmark::State& state, bool huge) { run_mlock(state, huge, true); }

// ---- iomm -----------------------------------------------------------------

void run_access(benchmark::State& state, iomm::Access& access, uint64_t iova) {
  for (auto _ : state) {
    auto pin = access.pin(iova, kLength, kRW);
    if (!pin) return fail(state, describe("Access::pin", pin.error()));
    benchmark::DoNotOptimize(pin->data());
    if (auto s = access.unpin(iova, kLength); !s)
      return fail(state, describe("Access::unpin", s.error()));
  }
  finish(state);
}

void BM_iomm_access(benchmark::State& state, bool huge) {
  PinFixture& f = fixture(huge);
  if (!f.error.empty()) return fail(state, f.error);
  run_access(state, *f.access, f.iova);
}

void BM_iomm_access_charged(benchmark::State& state, bool huge) {
  PinFixture& f = fixture(huge);
  if (!f.charged_error.empty()) return fail(state, f.charged_error);
  run_access(state, *f.access_charged, f.iova_charged);
  state.counters["charged_MiB"] = static_cast<double>(f.charged_bytes_seen) / MiB;
}

void BM_iomm_attach_detach(benchmark::State& state, bool huge) {
  PinFixture& f = fixture(huge);
  if (!f.error.empty()) return fail(state, f.error);
  for (auto _ : state) {
    if (auto s = f.ioas->attach(f.domain); !s)
      return fail(state, describe("Ioas::attach", s.error()));
    if (auto s = f.ioas->detach(f.domain); !s)
      return fail(state, describe("Ioas::detach", s.error()));
  }
  finish(state);
}

// Diagnostic, for the breakdown of attach+detach: the same cycle while an
// Access pin holds the whole range, so the attach's pin and the detach's
// unpin only count (no mlock, munlock or discard check) and what is left is
// the attach's and detach's own work: filling and clearing the domain's
// leaf, its tables, the grace period and the bookkeeping. attach+detach is about this
// plus an Access pin+unpin.
void BM_iomm_attach_detach_prepinned(benchmark::State& state, bool huge) {
  PinFixture& f = fixture(huge);
  if (!f.error.empty()) return fail(state, f.error);
  auto pin = f.access->pin(f.iova, kLength, kRW);
  if (!pin) return fail(state, describe("Access::pin (held)", pin.error()));
  for (auto _ : state) {
    if (auto s = f.ioas->attach(f.domain); !s) {
      (void)f.access->unpin(f.iova, kLength);
      return fail(state, describe("Ioas::attach", s.error()));
    }
    if (auto s = f.ioas->detach(f.domain); !s) {
      (void)f.access->unpin(f.iova, kLength);
      return fail(state, describe("Ioas::detach", s.error()));
    }
  }
  if (auto s = f.access->unpin(f.iova, kLength); !s)
    return fail(state, describe("Access::unpin (held)", s.error()));
  finish(state);
}

void register_all() {
  for (bool huge : {false, true}) {
    const std::string p = huge ? "pin_1GiB/2M/" : "pin_1GiB/4K/";
    auto reg = [&](const std::string& name, void (*fn)(benchmark::State&, bool)) {
      benchmark::RegisterBenchmark((p + name).c_str(), fn, huge)
          ->Unit(benchmark::kMillisecond)
          ->MinTime(0.5)
          ->UseRealTime();
    };
    reg("mlock", BM_mlock);
    reg("iomm_access", BM_iomm_access);
    reg("mlock_populate", BM_mlock_populate);
    reg("iomm_attach_detach", BM_iomm_attach_detach);
    reg("iomm_access_charged", BM_iomm_access_charged);
    reg("iomm_attach_detach_prepinned", BM_iomm_attach_detach_prepinned);
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  g_f4k.reset();
  g_f2m.reset();
  restore_hugepages();
  // Leak check: every pin and charge taken by the benchmarks must be gone.
  const iomm::Counters c = iomm::counters();
  std::fprintf(stderr,
               "pin_bench after teardown: pinned_bytes=%llu charged_bytes=%llu vmlck_bytes=%llu\n",
               static_cast<unsigned long long>(c.pinned_bytes),
               static_cast<unsigned long long>(c.charged_bytes),
               static_cast<unsigned long long>(c.vmlck_bytes));
  if (c.pinned_bytes != 0 || c.charged_bytes != 0 || c.vmlck_bytes != 0) return 2;
  return 0;
}
