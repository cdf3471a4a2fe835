// The VFIO type1 layer: mediated per-page pins, unmap with a pinning
// access, and metadata per pinned page.
#include <benchmark/benchmark.h>
#include <linux/vfio.h>
#include <malloc.h>
#include <sys/mman.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

#include "iomm/vfio_compat.h"

namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kIova = 1ULL << 30;

struct Setup {
  explicit Setup(size_t pages, iomm_vfio_dma_unmap_fn cb) : bytes(pages * kPage) {
    mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    c = iomm_vfio_open();
    g = iomm_vfio_group_create_mediated(c, cb, this);
    iomm_vfio_ioctl(c, VFIO_SET_IOMMU, reinterpret_cast<void*>(VFIO_TYPE1v2_IOMMU));
  }
  int map() {
    vfio_iommu_type1_dma_map m{.argsz = sizeof(m),
                               .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                               .vaddr = reinterpret_cast<uint64_t>(mem),
                               .iova = kIova,
                               .size = bytes};
    return static_cast<int>(iomm_vfio_ioctl(c, VFIO_IOMMU_MAP_DMA, &m));
  }
  ~Setup() {
    iomm_vfio_group_destroy(g);
    iomm_vfio_close(c);
    munmap(mem, bytes);
  }
  size_t bytes;
  void* mem;
  iomm_vfio_container* c;
  iomm_vfio_group* g;
  std::vector<uint64_t> held;
};

void noop(void*, uint64_t, uint64_t) {}

// Pin and unpin 512 pages whose count is already 1.
void BM_repin_iomm(benchmark::State& state) {
  Setup s(512, noop);
  s.map();
  std::vector<void*> host(512);
  iomm_vfio_pin_pages(s.g, kIova, 512, IOMM_VFIO_PROT_WRITE, host.data());
  for (auto _ : state) {
    iomm_vfio_pin_pages(s.g, kIova, 512, IOMM_VFIO_PROT_WRITE, host.data());
    iomm_vfio_unpin_pages(s.g, kIova, 512);
  }
  iomm_vfio_unpin_pages(s.g, kIova, 512);
  state.SetItemsProcessed(state.iterations() * 512);
}
BENCHMARK(BM_repin_iomm)->Name("type1_repin/iomm");

// Baseline: type1's vfio_pfn shape, a mutex-protected std::map of refcounts.
void BM_repin_map(benchmark::State& state) {
  std::mutex mu;
  std::map<uint64_t, std::pair<uint64_t, int>> pfns;
  for (uint64_t i = 0; i < 512; ++i) pfns[kIova + i * kPage] = {i, 1};
  std::vector<void*> host(512);
  for (auto _ : state) {
    {
      std::lock_guard lk(mu);
      for (uint64_t i = 0; i < 512; ++i) {
        auto& e = pfns[kIova + i * kPage];
        ++e.second;
        host[i] = reinterpret_cast<void*>(e.first);
      }
    }
    std::lock_guard lk(mu);
    for (uint64_t i = 0; i < 512; ++i) --pfns.find(kIova + i * kPage)->second.second;
    benchmark::DoNotOptimize(host.data());
  }
  state.SetItemsProcessed(state.iterations() * 512);
}
BENCHMARK(BM_repin_map)->Name("type1_repin/std_map_mutex");

void unpin_cb(void* opaque, uint64_t, uint64_t) {
  auto* s = static_cast<Setup*>(opaque);
  for (uint64_t iova : s->held) iomm_vfio_unpin_pages(s->g, iova, 1);
  s->held.clear();
}

// One map + pin + unmap-with-callback round trip; the timed part is the unmap.
void BM_unmap_with_pins(benchmark::State& state) {
  Setup s(16, unpin_cb);
  void* host = nullptr;
  for (auto _ : state) {
    state.PauseTiming();
    s.map();
    iomm_vfio_pin_pages(s.g, kIova, 1, IOMM_VFIO_PROT_WRITE, &host);
    s.held.push_back(kIova);
    state.ResumeTiming();
    vfio_iommu_type1_dma_unmap u{.argsz = sizeof(u), .iova = kIova, .size = s.bytes};
    iomm_vfio_ioctl(s.c, VFIO_IOMMU_UNMAP_DMA, &u);
  }
}
BENCHMARK(BM_unmap_with_pins)->Name("type1_unmap/one_access_pinning")->UseRealTime();

// Heap bytes per mediated-pinned page, dense (every page) and fragmented
// (every 64th page), including the pin store's bookkeeping.
void BM_metadata(benchmark::State& state) {
  const bool dense = state.range(0) == 1;
  const size_t pages = 65536;
  Setup s(pages, noop);
  s.map();
  double per_page = 0;
  for (auto _ : state) {
    const size_t before = mallinfo2().uordblks;
    void* host = nullptr;
    size_t n = 0;
    for (size_t i = 0; i < pages; i += dense ? 1 : 64, ++n) {
      iomm_vfio_pin_pages(s.g, kIova + i * kPage, 1, IOMM_VFIO_PROT_WRITE, &host);
    }
    per_page = static_cast<double>(mallinfo2().uordblks - before) / static_cast<double>(n);
    for (size_t i = 0; i < pages; i += dense ? 1 : 64) {
      iomm_vfio_unpin_pages(s.g, kIova + i * kPage, 1);
    }
  }
  state.counters["bytes_per_page"] = per_page;
}
BENCHMARK(BM_metadata)
    ->Name("type1_metadata")
    ->Arg(1)
    ->Arg(0)
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
