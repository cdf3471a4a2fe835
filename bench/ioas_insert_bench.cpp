// IOAS insert: Ioas::map of a simulated source into an IOAS with no domain
// records the mapping and pins or touches nothing (lazy pinning), so its cost
// must not depend on the size. What this measures is the IOAS's own work (IOVA
// allocation, the area tree insert, accounting setup), not a file map: the
// source is simulated and no domain is attached.
//
// - "ioas_insert/simulated_1TiB" times Ioas::map only (manual timing with
//   steady_clock around the call); the unmap that restores the empty IOAS
//   runs outside the timed window. Target: <= 100 us.
// - "ioas_insert_remove/simulated_1TiB" times the map + unmap pair.
// - "ioas_insert/simulated_4KiB" is the same insert of a 4 KiB source: the
//   size-independence check (1 TiB should cost about the same as 4 KiB).
// The source is created once (simulated sources carry a process-wide serial).
#include <benchmark/benchmark.h>

#include <chrono>
#include <memory>
#include <string>

#include "bench_util.hpp"
#include "iomm/domain.hpp"
#include "iomm/ioas.hpp"
#include "iomm/source.hpp"

using namespace iomm_bench;

namespace {

constexpr uint64_t TiB = 1ULL << 40;
constexpr uint32_t kRW = iomm::kProtRead | iomm::kProtWrite;

struct LazyFixture {
  std::string error;
  std::shared_ptr<iomm::Ioas> ioas;
  std::unique_ptr<iomm::MemorySource> big;
  std::unique_ptr<iomm::MemorySource> small;
};

LazyFixture& fixture() {
  static LazyFixture f = [] {
    LazyFixture x;
    auto ioas = iomm::Ioas::create();
    if (!ioas) {
      x.error = describe("Ioas::create", ioas.error());
      return x;
    }
    x.ioas = *ioas;
    auto big = iomm::MemorySource::simulated(TiB);
    if (!big) {
      x.error = describe("MemorySource::simulated(1 TiB)", big.error());
      return x;
    }
    x.big = std::make_unique<iomm::MemorySource>(*big);
    auto small = iomm::MemorySource::simulated(4 * KiB);
    if (!small) {
      x.error = describe("MemorySource::simulated(4 KiB)", small.error());
      return x;
    }
    x.small = std::make_unique<iomm::MemorySource>(*small);
    return x;
  }();
  return f;
}

void run_map_only(benchmark::State& state, const iomm::MemorySource& src) {
  LazyFixture& f = fixture();
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    auto iova = f.ioas->map(src, kRW);
    const auto t1 = std::chrono::steady_clock::now();
    if (!iova) return fail(state, describe("Ioas::map", iova.error()));
    state.SetIterationTime(std::chrono::duration<double>(t1 - t0).count());
    auto bytes = f.ioas->unmap(*iova, src.length());
    if (!bytes) return fail(state, describe("Ioas::unmap", bytes.error()));
    if (*bytes != src.length())
      return fail(state, "Ioas::unmap returned " + std::to_string(*bytes) + " bytes");
  }
}

void BM_map_1TiB(benchmark::State& state) {
  LazyFixture& f = fixture();
  if (!f.error.empty()) return fail(state, f.error);
  run_map_only(state, *f.big);
  // Lazy: nothing may be pinned afterwards, and nothing during (checked once).
}

void BM_map_4KiB(benchmark::State& state) {
  LazyFixture& f = fixture();
  if (!f.error.empty()) return fail(state, f.error);
  run_map_only(state, *f.small);
}

void BM_map_unmap_1TiB(benchmark::State& state) {
  LazyFixture& f = fixture();
  if (!f.error.empty()) return fail(state, f.error);
  for (auto _ : state) {
    auto iova = f.ioas->map(*f.big, kRW);
    if (!iova) return fail(state, describe("Ioas::map", iova.error()));
    auto bytes = f.ioas->unmap(*iova, TiB);
    if (!bytes) return fail(state, describe("Ioas::unmap", bytes.error()));
  }
}

// One-off check that the 1 TiB map is really lazy: the mapping reports
// unpinned and the process-wide simulated pin counter does not move.
void BM_map_1TiB_lazy_check(benchmark::State& state) {
  LazyFixture& f = fixture();
  if (!f.error.empty()) return fail(state, f.error);
  for (auto _ : state) {
    auto iova = f.ioas->map(*f.big, kRW);
    if (!iova) return fail(state, describe("Ioas::map", iova.error()));
    state.PauseTiming();
    const auto maps = f.ioas->mappings();
    const bool pinned = maps.size() != 1 || maps[0].pinned;
    const auto c = iomm::counters();
    state.ResumeTiming();
    auto bytes = f.ioas->unmap(*iova, TiB);
    if (!bytes) return fail(state, describe("Ioas::unmap", bytes.error()));
    if (pinned || c.simulated_pinned_bytes != 0) {
      return fail(state, "map of 1 TiB pinned memory: simulated_pinned_bytes=" +
                             std::to_string(c.simulated_pinned_bytes));
    }
  }
}

}  // namespace

BENCHMARK(BM_map_1TiB)
    ->Name("ioas_insert/simulated_1TiB")
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_map_4KiB)
    ->Name("ioas_insert/simulated_4KiB")
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_map_unmap_1TiB)
    ->Name("ioas_insert_remove/simulated_1TiB")
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_map_1TiB_lazy_check)
    ->Name("ioas_insert/lazy_check")
    ->Iterations(10)
    ->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();
