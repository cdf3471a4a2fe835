// vhost-user-blk back end throughput (issue #10), against same-run
// baselines:
// - 4 KiB random reads served per second: the test front end
//   (tests/vhost_frontend.hpp, guest memory sealed as QEMU's memfd backend
//   seals it) in GPA mode, batches of 32 requests, against a loop of pread
//   of the same offsets on the same file;
// - the same in IOTLB mode (the whole guest memory in one IOTLB entry, so
//   the steady state has no misses) against GPA mode;
// - one IOTLB invalidation while the IOTLB holds 1 or 1000 entries.
// The reads' time is CPU time of the thread that serves them (manual time):
// the back end's thread for vhost, the benchmark's own for pread. The front
// end plays the guest, whose CPU is not the back end's cost, and the
// machine is shared, so wall time would measure the other tenants too.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <ctime>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench_util.hpp"
#include "iomm/vring_cache.hpp"
#include "vhost/blk_image.hpp"
#include "vhost/iotlb.hpp"
#include "vhost/memory_table.hpp"
#include "vhost_frontend.hpp"

namespace {

using iomm::vhost::BlkBackendOptions;
using iomm::vhost::BlkImage;
using iomm::vhost::UniqueFd;
using iomm::vhost::test::BackendThread;
using iomm::vhost::test::Frontend;
using iomm::vhost::test::FrontendOptions;
using iomm_bench::MiB;

constexpr uint64_t kImageBytes = 64 * MiB;
constexpr int kBatch = 32;
constexpr int kOffsets = 4096;

struct ImageFile {
  UniqueFd fd{::memfd_create("bench-image", MFD_CLOEXEC)};
  std::optional<BlkImage> blk;
  std::vector<uint64_t> sectors;  // the same random 4 KiB reads for every benchmark
  ImageFile() {
    std::vector<uint8_t> chunk(MiB);
    for (uint64_t off = 0; off < kImageBytes; off += MiB) {
      for (size_t i = 0; i < chunk.size(); ++i) chunk[i] = static_cast<uint8_t>(off / MiB + i);
      if (::pwrite(fd.get(), chunk.data(), chunk.size(), static_cast<off_t>(off)) !=
          static_cast<ssize_t>(chunk.size()))
        std::abort();
    }
    auto img = BlkImage::open("/proc/self/fd/" + std::to_string(fd.get()), false);
    if (!img) std::abort();
    blk.emplace(std::move(*img));
    std::mt19937_64 rng(42);
    for (int i = 0; i < kOffsets; ++i) sectors.push_back((rng() % (kImageBytes / 4096)) * 8);
  }
};

ImageFile& image() {
  static ImageFile f;
  return f;
}

uint64_t thread_cpu_ns() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ULL + static_cast<uint64_t>(ts.tv_nsec);
}

void BM_PreadRandom4K(benchmark::State& state) {
  ImageFile& img = image();
  std::vector<uint8_t> buf(4096);
  size_t next = 0;
  for (auto _ : state) {
    const uint64_t t0 = thread_cpu_ns();
    for (int i = 0; i < kBatch; ++i) {
      const uint64_t s = img.sectors[next++ % kOffsets];
      if (::pread(img.fd.get(), buf.data(), 4096, static_cast<off_t>(s * 512)) != 4096) {
        iomm_bench::fail(state, "pread");
        return;
      }
      benchmark::DoNotOptimize(buf.data());
    }
    state.SetIterationTime(static_cast<double>(thread_cpu_ns() - t0) * 1e-9);
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
}

void run_vhost(benchmark::State& state, bool iotlb) {
  ImageFile& img = image();
  BlkBackendOptions b;
  BackendThread be(*img.blk, b);
  FrontendOptions o;
  o.iotlb = iotlb;
  o.queue_size = 128;
  o.mem_size = 16 * MiB;
  o.indirect = false;
  Frontend fe(be.take_socket(), o);
  fe.setup();
  if (iotlb) {
    fe.update(iomm::vhost::test::kIovaBase, o.mem_size, fe.uaddr(iomm::vhost::test::kGpaBase),
              iomm::vhost::kAccessRw);
  }
  std::vector<uint64_t> bufs;
  for (int i = 0; i < kBatch; ++i) bufs.push_back(fe.alloc(4096, 4096));
  size_t next = 0;
  for (auto _ : state) {
    const uint64_t t0 = be.cpu_ns();
    for (int i = 0; i < kBatch; ++i)
      fe.submit(0, iomm::vhost::kBlkTIn, img.sectors[next++ % kOffsets], bufs[i], 4096, false,
                i == kBatch - 1);
    fe.wait(0, kBatch);
    state.SetIterationTime(static_cast<double>(be.cpu_ns() - t0) * 1e-9);
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
  fe.close();
  (void)be.join();
}

void BM_VhostGpaRandom4K(benchmark::State& state) { run_vhost(state, false); }
void BM_VhostIotlbRandom4K(benchmark::State& state) { run_vhost(state, true); }

// One INVALIDATE of a 4 KiB entry while the IOTLB holds state.range(0)
// entries; the entry holds a queue's rings, cached by a VringCache, so the
// INVALIDATE also drops the cache's pointers through its notifiers, as in
// the back end. The entry is put back and the cache revalidated outside the
// timed region.
void BM_IotlbInvalidate(benchmark::State& state) {
  const uint64_t entries = static_cast<uint64_t>(state.range(0));
  UniqueFd mem(::memfd_create("bench-guest", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  const uint64_t size = entries * 4096;
  if (::ftruncate(mem.get(), static_cast<off_t>(size)) != 0 ||
      ::fcntl(mem.get(), F_ADD_SEALS, F_SEAL_SHRINK) != 0)
    std::abort();
  std::vector<UniqueFd> fds;
  fds.emplace_back(::dup(mem.get()));
  const iomm::vhost::MemRegion r{0, size, 0x7f0000000000, 0};
  auto table = iomm::vhost::MemoryTable::create(std::span(&r, 1), std::move(fds));
  auto tlb = iomm::vhost::Iotlb::create();
  if (!table || !tlb) {
    iomm_bench::fail(state, "setup");
    return;
  }
  for (uint64_t i = 0; i < entries; ++i)
    if (!tlb->update(*table, 0x100000000 + i * 4096, 4096, r.userspace_addr + i * 4096,
                     iomm::vhost::kAccessRw)) {
      iomm_bench::fail(state, "update");
      return;
    }
  const uint64_t victim = entries / 2;
  const uint64_t ring_iova = 0x100000000 + victim * 4096;
  iomm::VringLayout layout;
  layout.desc_iova = ring_iova;
  layout.avail_iova = ring_iova + 1024;
  layout.used_iova = ring_iova + 2048;
  layout.size = 64;
  auto cache = iomm::VringCache::create(tlb->space().ioas_ptr(), layout);
  if (!cache || !(*cache)->cached()) {
    iomm_bench::fail(state, "ring cache");
    return;
  }
  for (auto _ : state) {
    if (!tlb->invalidate(ring_iova, 4096)) std::abort();
    state.PauseTiming();
    if (!tlb->update(*table, ring_iova, 4096, r.userspace_addr + victim * 4096,
                     iomm::vhost::kAccessRw) ||
        !(*cache)->avail_idx() || !(*cache)->cached())
      std::abort();
    state.ResumeTiming();
  }
  state.counters["entries"] = static_cast<double>(tlb->entries());
  state.counters["ring_invalidations"] = static_cast<double>((*cache)->stats().invalidations);
}

BENCHMARK(BM_PreadRandom4K)->Name("vhost_blk/random_read_4k/pread")->UseManualTime();
BENCHMARK(BM_VhostGpaRandom4K)->Name("vhost_blk/random_read_4k/gpa")->UseManualTime();
BENCHMARK(BM_VhostIotlbRandom4K)->Name("vhost_blk/random_read_4k/iotlb")->UseManualTime();
BENCHMARK(BM_IotlbInvalidate)
    ->Name("vhost_blk/iotlb_invalidate")
    ->ArgName("entries")
    ->Arg(1)
    ->Arg(1000);

}  // namespace

BENCHMARK_MAIN();
