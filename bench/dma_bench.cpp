// DMA through a SoftDomain vs plain memcpy between the same two buffers.
//
// A memfd is mapped into an IOAS with a SoftDomain attached (so the mapping
// is pinned and its page table filled). The device side is
// SoftDomain::dma_read / dma_write of 64 KiB at the mapping's IOVA; the
// baseline is memcpy of 64 KiB between the same user buffer and the same host
// address (MemorySource::host_address(), the library's own mapping of the
// memfd), so both touch exactly the same cache lines.
//
// Two layouts (the benchmark argument is the mapping size):
// - 64 KiB mapping: 16 separate 4 KiB leaves (the walk extends a run across
//   them in one descent);
// - 2 MiB mapping: one 2 MiB leaf (IOVA and host address both 2 MiB aligned).
// The 64 KiB transfer always starts at the mapping's first byte.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>

#include "bench_util.hpp"
#include "iomm/domain.hpp"
#include "iomm/ioas.hpp"
#include "iomm/source.hpp"

using namespace iomm_bench;

namespace {

constexpr size_t kXfer = 64 * KiB;

struct DmaFixture {
  std::string error;
  int fd = -1;
  std::shared_ptr<iomm::Ioas> ioas;
  std::shared_ptr<iomm::SoftDomain> domain;
  uint64_t iova = 0;
  void* host = nullptr;
  void* buf = nullptr;
  uint64_t leaves_4k = 0, leaves_2m = 0;
  ~DmaFixture() {
    ioas.reset();
    domain.reset();
    std::free(buf);
    if (fd >= 0) close(fd);
  }
};

std::unique_ptr<DmaFixture> build(uint64_t mapping) {
  auto f = std::make_unique<DmaFixture>();
  f->fd = memfd_create("iomm-bench-dma", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (f->fd < 0 || ftruncate(f->fd, static_cast<off_t>(mapping)) != 0 ||
      fcntl(f->fd, F_ADD_SEALS, F_SEAL_SHRINK) != 0) {
    f->error = std::string("memfd_create/ftruncate/F_ADD_SEALS: ") + std::strerror(errno);
    return f;
  }
  auto src = iomm::MemorySource::from_file(f->fd, 0, mapping);
  if (!src) {
    f->error = describe("MemorySource::from_file", src.error());
    return f;
  }
  DomainSetup setup = ioas_with_domain();
  if (!setup.error.empty()) {
    f->error = setup.error;
    return f;
  }
  f->ioas = setup.ioas;
  f->domain = setup.domain;
  auto iova = f->ioas->map(*src, iomm::kProtRead | iomm::kProtWrite);
  if (!iova) {
    f->error = describe("Ioas::map (domain attached: pins)", iova.error());
    return f;
  }
  f->iova = *iova;
  f->host = src->host_address();
  f->buf = std::aligned_alloc(4096, kXfer);
  if (f->host == nullptr || f->buf == nullptr) {
    f->error = "no host address or buffer";
    return f;
  }
  // Correctness check of both directions.
  auto* b = static_cast<unsigned char*>(f->buf);
  for (size_t i = 0; i < kXfer; ++i) b[i] = static_cast<unsigned char>(i * 7 + 3);
  if (auto s = f->domain->dma_write(f->iova, f->buf, kXfer); !s) {
    f->error = describe("SoftDomain::dma_write", s.error());
    return f;
  }
  if (std::memcmp(f->host, f->buf, kXfer) != 0) {
    f->error = "dma_write did not land at the host address";
    return f;
  }
  std::memset(f->buf, 0, kXfer);
  if (auto s = f->domain->dma_read(f->iova, f->buf, kXfer); !s) {
    f->error = describe("SoftDomain::dma_read", s.error());
    return f;
  }
  if (std::memcmp(f->host, f->buf, kXfer) != 0) {
    f->error = "dma_read did not return the host bytes";
    return f;
  }
  const auto c = f->domain->counters();
  f->leaves_4k = c.leaves_4k;
  f->leaves_2m = c.leaves_2m;
  return f;
}

std::map<uint64_t, std::unique_ptr<DmaFixture>> g_fixtures;

DmaFixture& fixture(uint64_t mapping) {
  auto& f = g_fixtures[mapping];
  if (!f) f = build(mapping);
  return *f;
}

void finish(benchmark::State& state, const DmaFixture& f) {
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kXfer));
  state.counters["leaves_4k"] = static_cast<double>(f.leaves_4k);
  state.counters["leaves_2m"] = static_cast<double>(f.leaves_2m);
}

// Device DMA of kXfer bytes through the domain, to (write) or from (read)
// the mapping.
template <bool kWrite>
void BM_iomm(benchmark::State& state) {
  DmaFixture& f = fixture(static_cast<uint64_t>(state.range(0)));
  if (!f.error.empty()) return fail(state, f.error);
  for (auto _ : state) {
    auto s = kWrite ? f.domain->dma_write(f.iova, f.buf, kXfer)
                    : f.domain->dma_read(f.iova, f.buf, kXfer);
    if (!s)
      return fail(state,
                  describe(kWrite ? "SoftDomain::dma_write" : "SoftDomain::dma_read", s.error()));
    benchmark::ClobberMemory();
  }
  finish(state, f);
}

// The baseline: memcpy between the same buffer and the mapping's memory.
template <bool kWrite>
void BM_memcpy(benchmark::State& state) {
  DmaFixture& f = fixture(static_cast<uint64_t>(state.range(0)));
  if (!f.error.empty()) return fail(state, f.error);
  void* dst = kWrite ? f.host : f.buf;
  const void* src = kWrite ? f.buf : f.host;
  for (auto _ : state) {
    benchmark::DoNotOptimize(dst);
    benchmark::DoNotOptimize(src);
    std::memcpy(dst, src, kXfer);
    benchmark::ClobberMemory();
  }
  finish(state, f);
}

constexpr int64_t k64K = 64 * 1024;
constexpr int64_t k2M = 2 * 1024 * 1024;

}  // namespace

BENCHMARK(BM_memcpy<true>)->Name("dma_64KiB/write/memcpy")->ArgName("mapping")->Arg(k64K)->Arg(k2M);
BENCHMARK(BM_iomm<true>)->Name("dma_64KiB/write/iomm")->ArgName("mapping")->Arg(k64K)->Arg(k2M);
BENCHMARK(BM_memcpy<false>)->Name("dma_64KiB/read/memcpy")->ArgName("mapping")->Arg(k64K)->Arg(k2M);
BENCHMARK(BM_iomm<false>)->Name("dma_64KiB/read/iomm")->ArgName("mapping")->Arg(k64K)->Arg(k2M);

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  g_fixtures.clear();
  return 0;
}
