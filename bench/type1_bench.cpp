// The VFIO type1 layer: mediated per-page pins (repins and fresh pins),
// unmap with a pinning access, and metadata per pinned page.
#include <benchmark/benchmark.h>
#include <linux/vfio.h>
#include <malloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "bench_util.hpp"
#include "iomm/vfio_compat.h"

using iomm_bench::fail;

namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kIova = 1ULL << 30;

// "what: strerror(errno)" for a failed C call.
std::string errno_text(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

// A type1 container with one mediated group, the IOMMU set, and anonymous
// memory to map. error is empty when every step worked.
// With a memfd, the memory is a shared mapping of it, filled, and the fd is
// registered, so the library pins the file through its own mapping.
struct Setup {
  Setup(size_t pages, iomm_vfio_dma_unmap_fn cb, bool memfd = false) : bytes(pages * kPage) {
    if (memfd) {
      fd = memfd_create("iomm-bench-type1", MFD_CLOEXEC);
      if (fd < 0 || ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
        error = errno_text("memfd");
        return;
      }
    }
    mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
               memfd ? MAP_SHARED : MAP_PRIVATE | MAP_ANONYMOUS, fd, 0);
    if (mem == MAP_FAILED) {
      mem = nullptr;
      error = errno_text("mmap");
      return;
    }
    c = iomm_vfio_open();
    if (c == nullptr) {
      error = errno_text("iomm_vfio_open");
      return;
    }
    g = iomm_vfio_group_create_mediated(c, cb, this);
    if (g == nullptr) {
      error = errno_text("iomm_vfio_group_create_mediated");
      return;
    }
    if (iomm_vfio_ioctl(c, VFIO_SET_IOMMU, reinterpret_cast<void*>(VFIO_TYPE1v2_IOMMU)) != 0) {
      error = errno_text("VFIO_SET_IOMMU");
      return;
    }
    if (memfd) {
      std::memset(mem, 1, bytes);
      if (iomm_vfio_register_fd(c, fd) != 0) error = errno_text("iomm_vfio_register_fd");
    }
  }
  // MAP_DMA of the whole memory at kIova; an error message or "".
  std::string map() {
    vfio_iommu_type1_dma_map m{.argsz = sizeof(m),
                               .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                               .vaddr = reinterpret_cast<uint64_t>(mem),
                               .iova = kIova,
                               .size = bytes};
    return iomm_vfio_ioctl(c, VFIO_IOMMU_MAP_DMA, &m) == 0 ? "" : errno_text("VFIO_IOMMU_MAP_DMA");
  }
  ~Setup() {
    if (g != nullptr) iomm_vfio_group_destroy(g);
    if (c != nullptr) iomm_vfio_close(c);
    if (mem != nullptr) munmap(mem, bytes);
    if (fd >= 0) close(fd);
  }
  Setup(const Setup&) = delete;
  Setup& operator=(const Setup&) = delete;

  size_t bytes;
  int fd = -1;
  void* mem = nullptr;
  iomm_vfio_container* c = nullptr;
  iomm_vfio_group* g = nullptr;
  std::vector<uint64_t> held;
  std::string error;
  std::string callback_error;  // set by a callback whose unpin failed
};

// pin_pages / unpin_pages return npage on success.
std::string pin(Setup& s, uint64_t iova, int npage, void** host) {
  return iomm_vfio_pin_pages(s.g, iova, npage, IOMM_VFIO_PROT_WRITE, host) == npage
             ? ""
             : errno_text("iomm_vfio_pin_pages");
}
std::string unpin(Setup& s, uint64_t iova, int npage) {
  return iomm_vfio_unpin_pages(s.g, iova, npage) == npage ? ""
                                                          : errno_text("iomm_vfio_unpin_pages");
}

void noop(void*, uint64_t, uint64_t) {}

// Pin and unpin 512 pages whose count is already 1.
void BM_repin_iomm(benchmark::State& state) {
  Setup s(512, noop);
  if (!s.error.empty()) return fail(state, s.error);
  if (auto e = s.map(); !e.empty()) return fail(state, e);
  std::vector<void*> host(512);
  if (auto e = pin(s, kIova, 512, host.data()); !e.empty()) return fail(state, e);
  for (auto _ : state) {
    if (auto e = pin(s, kIova, 512, host.data()); !e.empty()) return fail(state, e);
    if (auto e = unpin(s, kIova, 512); !e.empty()) return fail(state, e);
  }
  if (auto e = unpin(s, kIova, 512); !e.empty()) return fail(state, e);
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

// Pin and unpin 512 pages at count 0 (2 MiB of a memfd): one pin of the
// backing object for the whole run.
void BM_fresh_pin_iomm(benchmark::State& state) {
  Setup s(512, noop, true);
  if (!s.error.empty()) return fail(state, s.error);
  if (auto e = s.map(); !e.empty()) return fail(state, e);
  std::vector<void*> host(512);
  for (auto _ : state) {
    if (auto e = pin(s, kIova, 512, host.data()); !e.empty()) return fail(state, e);
    if (auto e = unpin(s, kIova, 512); !e.empty()) return fail(state, e);
  }
  state.SetItemsProcessed(state.iterations() * 512);
}
BENCHMARK(BM_fresh_pin_iomm)->Name("type1_fresh_pin/iomm");

// Baseline: mlock + munlock of the same 2 MiB of the same memfd.
void BM_fresh_pin_mlock(benchmark::State& state) {
  Setup s(512, noop, true);
  if (!s.error.empty()) return fail(state, s.error);
  for (auto _ : state) {
    if (mlock(s.mem, s.bytes) != 0) return fail(state, errno_text("mlock"));
    if (munlock(s.mem, s.bytes) != 0) return fail(state, errno_text("munlock"));
  }
  state.SetItemsProcessed(state.iterations() * 512);
}
BENCHMARK(BM_fresh_pin_mlock)->Name("type1_fresh_pin/mlock");

void unpin_cb(void* opaque, uint64_t, uint64_t) {
  auto* s = static_cast<Setup*>(opaque);
  for (uint64_t iova : s->held) {
    if (auto e = unpin(*s, iova, 1); !e.empty()) s->callback_error = e;
  }
  s->held.clear();
}

// One map + pin + unmap-with-callback round trip; the timed part is the unmap.
// Wall time is taken around the ioctl alone (manual time): Google
// Benchmark's ResumeTiming() reads the thread CPU clock after it starts the
// wall clock, a system call (about 1 us on the benchmark VM) that the wall
// figure would otherwise count as part of the unmap.
void BM_unmap_with_pins(benchmark::State& state) {
  Setup s(16, unpin_cb);
  if (!s.error.empty()) return fail(state, s.error);
  void* host = nullptr;
  for (auto _ : state) {
    state.PauseTiming();
    if (auto e = s.map(); !e.empty()) return fail(state, e);
    if (auto e = pin(s, kIova, 1, &host); !e.empty()) return fail(state, e);
    s.held.push_back(kIova);
    state.ResumeTiming();
    vfio_iommu_type1_dma_unmap u{.argsz = sizeof(u), .iova = kIova, .size = s.bytes};
    const auto start = std::chrono::steady_clock::now();
    const int rc = iomm_vfio_ioctl(s.c, VFIO_IOMMU_UNMAP_DMA, &u);
    state.SetIterationTime(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    if (rc != 0) return fail(state, errno_text("VFIO_IOMMU_UNMAP_DMA"));
    if (u.size != s.bytes)
      return fail(state, "VFIO_IOMMU_UNMAP_DMA unmapped " + std::to_string(u.size));
    if (!s.callback_error.empty()) return fail(state, "dma_unmap callback: " + s.callback_error);
  }
}
BENCHMARK(BM_unmap_with_pins)->Name("type1_unmap/one_access_pinning")->UseManualTime();

// Heap bytes per mediated-pinned page, dense (every page) and fragmented
// (every 64th page), including the pin store's bookkeeping.
void BM_metadata(benchmark::State& state) {
  const bool dense = state.range(0) == 1;
  const size_t pages = 65536;
  Setup s(pages, noop);
  if (!s.error.empty()) return fail(state, s.error);
  if (auto e = s.map(); !e.empty()) return fail(state, e);
  double per_page = 0;
  for (auto _ : state) {
    // Arena and mmapped chunks alike: every structure the pins create.
    auto heap = [] {
      const struct mallinfo2 m = mallinfo2();
      return m.uordblks + m.hblkhd;
    };
    const size_t before = heap();
    void* host = nullptr;
    size_t n = 0;
    for (size_t i = 0; i < pages; i += dense ? 1 : 64, ++n) {
      if (auto e = pin(s, kIova + i * kPage, 1, &host); !e.empty()) return fail(state, e);
    }
    per_page = static_cast<double>(heap() - before) / static_cast<double>(n);
    for (size_t i = 0; i < pages; i += dense ? 1 : 64) {
      if (auto e = unpin(s, kIova + i * kPage, 1); !e.empty()) return fail(state, e);
    }
  }
  state.counters["bytes_per_page"] = per_page;
}
BENCHMARK(BM_metadata)
    ->Name("type1_metadata")
    ->ArgName("dense")
    ->Arg(1)
    ->Arg(0)
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
