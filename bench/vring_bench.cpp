// Split-ring access through the VringCache vs the same loop on raw pointers
// and vs a translated copy per access.
//
// A sealed 64 KiB memfd is mapped into an IOAS at kIova (no domain: nothing
// pinned) and holds a 256-entry ring: descriptor table, available ring
// (idx = 256, ring[i] = i) and used ring. One iteration processes the whole
// ring the way a back end does: acquire-load avail->idx, then per slot read
// the available entry, read the descriptor it names and write a used entry,
// then release-store used->idx. Three variants over the same memory:
// - raw:        plain __atomic loads and stores through the host address
//               (MemorySource::host_address()), the baseline the cache must
//               stay within 1.1x of;
// - cache:      one VringCache::Batch per pass (one validity handshake), run
//               through Batch::run (one check that each ring is one host
//               run, then inline accesses through the cached pointers with
//               no test per access but the descriptor index's);
// - translated: per access Ioas::host_segments then a copy (what a back end
//               without the cache does, and the cache's fallback minus its
//               sequence checks).
// Each adds the descriptors' addr + len to a checksum compared with the
// expected sum.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <string>

#include "bench_util.hpp"
#include "iomm/ioas.hpp"
#include "iomm/source.hpp"
#include "iomm/vring_cache.hpp"

using namespace iomm_bench;

namespace {

constexpr uint16_t kSize = 256;
constexpr uint64_t kIova = 0x100000;
constexpr uint64_t kFile = 64 * KiB;
constexpr uint64_t kDescOff = 0;
constexpr uint64_t kAvailOff = 16 * kSize;          // 4 KiB
constexpr uint64_t kUsedOff = kAvailOff + 4 * KiB;  // 8 KiB

struct RingFixture {
  std::string error;
  int fd = -1;
  std::shared_ptr<iomm::Ioas> ioas;
  std::byte* host = nullptr;
  std::unique_ptr<iomm::VringCache> cache;
  uint64_t expected = 0;
};

RingFixture* make_fixture() {
  auto* f = new RingFixture();
  f->fd = memfd_create("iomm-bench-vring", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (f->fd < 0 || ftruncate(f->fd, static_cast<off_t>(kFile)) != 0 ||
      fcntl(f->fd, F_ADD_SEALS, F_SEAL_SHRINK) != 0) {
    f->error = std::string("memfd: ") + std::strerror(errno);
    return f;
  }
  auto src = iomm::MemorySource::from_file(f->fd, 0, kFile);
  if (!src) {
    f->error = describe("from_file", src.error());
    return f;
  }
  auto ioas = iomm::Ioas::create({});
  if (!ioas) {
    f->error = describe("Ioas::create", ioas.error());
    return f;
  }
  f->ioas = *ioas;
  if (auto m = f->ioas->map(*src, iomm::kProtRead | iomm::kProtWrite, kIova); !m) {
    f->error = describe("map", m.error());
    return f;
  }
  f->host = static_cast<std::byte*>(src->host_address());
  for (uint16_t i = 0; i < kSize; ++i) {
    iomm::VringDesc d{0x10000ULL * i, 512U + i, 0, 0};
    std::memcpy(f->host + kDescOff + 16ULL * i, &d, sizeof(d));
    std::memcpy(f->host + kAvailOff + 4 + 2ULL * i, &i, 2);
    f->expected += d.addr + d.len;
  }
  const uint16_t idx = kSize;
  std::memcpy(f->host + kAvailOff + 2, &idx, 2);
  auto cache = iomm::VringCache::create(
      f->ioas, {kIova + kDescOff, kIova + kAvailOff, kIova + kUsedOff, kSize, false});
  if (!cache) {
    f->error = describe("VringCache::create", cache.error());
    return f;
  }
  f->cache = std::move(cache).value();
  if (!f->cache->cached()) f->error = "the cache did not validate its pointers";
  return f;
}

RingFixture& fixture() {
  static RingFixture* f = make_fixture();
  return *f;
}

template <typename T>
T load(const std::byte* p, int order) {
  return __atomic_load_n(reinterpret_cast<const T*>(p), order);
}

template <typename T>
void store(std::byte* p, T v, int order) {
  __atomic_store_n(reinterpret_cast<T*>(p), v, order);
}

void BM_RingRaw(benchmark::State& state) {
  RingFixture& f = fixture();
  if (!f.error.empty()) return fail(state, f.error);
  for (auto _ : state) {
    uint64_t sum = 0;
    const uint16_t avail = load<uint16_t>(f.host + kAvailOff + 2, __ATOMIC_ACQUIRE);
    for (uint16_t slot = 0; slot != avail; ++slot) {
      const uint16_t head =
          load<uint16_t>(f.host + kAvailOff + 4 + 2 * (slot & (kSize - 1)), __ATOMIC_RELAXED);
      if (head >= kSize) return fail(state, "bad head");
      const std::byte* d = f.host + kDescOff + 16ULL * (head & (kSize - 1));
      const uint64_t addr = load<uint64_t>(d, __ATOMIC_RELAXED);
      const uint32_t len = load<uint32_t>(d + 8, __ATOMIC_RELAXED);
      benchmark::DoNotOptimize(load<uint16_t>(d + 12, __ATOMIC_RELAXED));
      benchmark::DoNotOptimize(load<uint16_t>(d + 14, __ATOMIC_RELAXED));
      sum += addr + len;
      std::byte* u = f.host + kUsedOff + 4 + 8ULL * (slot & (kSize - 1));
      store<uint32_t>(u, head, __ATOMIC_RELAXED);
      store<uint32_t>(u + 4, len, __ATOMIC_RELAXED);
    }
    store<uint16_t>(f.host + kUsedOff + 2, avail, __ATOMIC_RELEASE);
    if (sum != f.expected) return fail(state, "checksum mismatch");
  }
  state.SetItemsProcessed(state.iterations() * kSize);
}

void BM_RingCache(benchmark::State& state) {
  RingFixture& f = fixture();
  if (!f.error.empty()) return fail(state, f.error);
  iomm::VringCache& c = *f.cache;
  const iomm::VringCacheStats before = c.stats();
  for (auto _ : state) {
    // One batch per pass over the ring, as a back end opens it, and one
    // run() (the check whether each ring is one host run, for the pass);
    // its sticky error is checked once, at the end of the pass.
    iomm::VringCache::Batch b = c.batch();
    uint64_t sum = 0;
    b.run([&sum](auto& r) {
      const uint16_t avail = r.avail_idx();
      for (uint16_t slot = 0; slot != avail; ++slot) {
        const uint16_t head = r.avail_entry(slot);
        const iomm::VringDesc d = r.desc(head);
        sum += d.addr + d.len;
        r.set_used_entry(slot, head, d.len);
      }
      r.set_used_idx(avail);
    });
    if (!b.ok()) return fail(state, describe("the pass", b.status().error()));
    if (sum != f.expected) return fail(state, "checksum mismatch");
  }
  const iomm::VringCacheStats after = c.stats();
  if (after.slow_accesses != before.slow_accesses ||
      after.uncached_batches != before.uncached_batches) {
    fail(state, "the cache fell back to copies");
  }
  state.SetItemsProcessed(state.iterations() * kSize);
}

// One translated copy of n bytes at iova (read or write).
bool translated(const iomm::Ioas& ioas, uint64_t iova, void* buf, size_t n, bool write) {
  auto segs = ioas.host_segments(iova, n, write ? iomm::kProtWrite : iomm::kProtRead);
  if (!segs || segs->size() != 1) return false;
  if (write) {
    std::memcpy((*segs)[0].host, buf, n);
  } else {
    std::memcpy(buf, (*segs)[0].host, n);
  }
  return true;
}

void BM_RingTranslatedCopies(benchmark::State& state) {
  RingFixture& f = fixture();
  if (!f.error.empty()) return fail(state, f.error);
  const iomm::Ioas& ioas = *f.ioas;
  for (auto _ : state) {
    uint64_t sum = 0;
    uint16_t avail = 0;
    bool ok = translated(ioas, kIova + kAvailOff + 2, &avail, 2, false);
    std::atomic_thread_fence(std::memory_order_acquire);
    for (uint16_t slot = 0; ok && slot != avail; ++slot) {
      uint16_t head = 0;
      ok = translated(ioas, kIova + kAvailOff + 4 + 2 * (slot & (kSize - 1)), &head, 2, false);
      iomm::VringDesc d;
      ok = ok && translated(ioas, kIova + kDescOff + 16ULL * (head & (kSize - 1)), &d, 16, false);
      sum += d.addr + d.len;
      uint32_t elem[2] = {head, d.len};
      ok =
          ok && translated(ioas, kIova + kUsedOff + 4 + 8ULL * (slot & (kSize - 1)), elem, 8, true);
    }
    std::atomic_thread_fence(std::memory_order_release);
    ok = ok && translated(ioas, kIova + kUsedOff + 2, &avail, 2, true);
    if (!ok) return fail(state, "translation failed");
    if (sum != f.expected) return fail(state, "checksum mismatch");
  }
  state.SetItemsProcessed(state.iterations() * kSize);
}

}  // namespace

BENCHMARK(BM_RingRaw);
BENCHMARK(BM_RingCache);
BENCHMARK(BM_RingTranslatedCopies);

BENCHMARK_MAIN();
