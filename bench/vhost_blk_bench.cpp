// vhost-user-blk back end throughput (issue #10), against same-run
// baselines:
// - 4 KiB random reads served per second: the test front end
//   (tests/vhost_frontend.hpp, guest memory sealed as QEMU's memfd backend
//   seals it) in GPA mode, against a loop of pread of the same offsets on
//   the same file into as many buffers;
// - the same in IOTLB mode (the whole guest memory in one IOTLB entry, so
//   the steady state has no misses) against GPA mode;
// - one IOTLB invalidation while the IOTLB holds 1 or 1000 entries.
// Throughput is the back end's when it has work: the front end keeps
// kInFlight batches of kBatch reads in the queue, reaps a batch by polling
// the used ring (a driver's poll queue, no interrupts) and resubmits it,
// kicking only when the back end asked (event index). The time of a batch
// is the back end thread's CPU time (manual time) across the reaping and
// resubmission of one batch, against the pread loop's own CPU time per
// batch: the front end plays the guest, whose CPU is not the back end's
// cost, and the machine is shared, so wall time would measure the other
// tenants too. The one_batch row (report) is the other pattern: one batch
// at a time, each waited for with an interrupt, so the back end sleeps in
// poll() and is woken by a kick once per batch; its CPU time then includes
// what going idle and waking costs on this machine, which is what made the
// earlier form of the GPA row (this pattern) range from 0.41x to 0.83x
// (bench/NOTES.md).
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
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
// Batches the front end keeps in the queue (3 descriptors per request).
constexpr int kInFlight = 4;
constexpr uint16_t kQueueSize = 512;
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

// Reads into as many page-aligned 4 KiB buffers, in the same rotation, as
// the front end keeps in flight: the same destination footprint as the
// back end's, so the comparison is of the serving path alone.
void BM_PreadRandom4K(benchmark::State& state) {
  ImageFile& img = image();
  constexpr size_t kBufs = kBatch * kInFlight;
  void* p =
      ::mmap(nullptr, kBufs * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    iomm_bench::fail(state, "mmap");
    return;
  }
  auto* bufs = static_cast<uint8_t*>(p);
  std::memset(bufs, 0, kBufs * 4096);
  size_t next = 0;
  size_t slot = 0;
  for (auto _ : state) {
    const uint64_t t0 = thread_cpu_ns();
    for (int i = 0; i < kBatch; ++i) {
      const uint64_t s = img.sectors[next++ % kOffsets];
      uint8_t* buf = bufs + (slot * kBatch + i) * 4096;
      if (::pread(img.fd.get(), buf, 4096, static_cast<off_t>(s * 512)) != 4096) {
        iomm_bench::fail(state, "pread");
        break;
      }
      benchmark::DoNotOptimize(buf);
    }
    slot = (slot + 1) % kInFlight;
    state.SetIterationTime(static_cast<double>(thread_cpu_ns() - t0) * 1e-9);
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
  ::munmap(p, kBufs * 4096);
}

enum class Pattern { pipelined, one_batch };

void run_vhost(benchmark::State& state, bool iotlb, Pattern pattern) {
  ImageFile& img = image();
  BlkBackendOptions b;
  b.queue_size = kQueueSize;
  BackendThread be(*img.blk, b);
  FrontendOptions o;
  o.iotlb = iotlb;
  o.queue_size = kQueueSize;
  o.mem_size = 16 * MiB;
  o.indirect = false;
  Frontend fe(be.take_socket(), o);
  fe.setup();
  if (iotlb) {
    fe.update(iomm::vhost::test::kIovaBase, o.mem_size, fe.uaddr(iomm::vhost::test::kGpaBase),
              iomm::vhost::kAccessRw);
  }
  const int in_flight = pattern == Pattern::pipelined ? kInFlight : 1;
  std::vector<uint64_t> bufs;
  for (int i = 0; i < kBatch * kInFlight; ++i) bufs.push_back(fe.alloc(4096, 4096));
  size_t next = 0;
  int slot = 0;  // the batch of buffers the next submission uses
  // Kicks the back end asked for: each one means it had run out of work and
  // went to sleep in poll() (pipelined, that should be rare).
  uint64_t kicks = 0;
  auto submit_batch = [&] {
    const uint16_t before = fe.avail_idx(0);
    for (int i = 0; i < kBatch; ++i)
      fe.submit(0, iomm::vhost::kBlkTIn, img.sectors[next++ % kOffsets], bufs[slot * kBatch + i],
                4096, false, false);
    if (fe.kick_if_needed(0, before)) ++kicks;
    slot = (slot + 1) % kInFlight;
  };
  auto reap_batch = [&] {
    const auto done = pattern == Pattern::pipelined ? fe.poll_wait(0, kBatch) : fe.wait(0, kBatch);
    for (const auto& c : done)
      if (fe.status(0, c.id) != iomm::vhost::kBlkSOk || c.len != 4097) return false;
    return true;
  };
  for (int i = 1; i < in_flight; ++i) submit_batch();
  for (auto _ : state) {
    const uint64_t t0 = be.cpu_ns();
    submit_batch();
    if (!reap_batch()) {
      iomm_bench::fail(state, "read failed");
      break;
    }
    state.SetIterationTime(static_cast<double>(be.cpu_ns() - t0) * 1e-9);
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
  state.counters["kicks_per_batch"] =
      benchmark::Counter(static_cast<double>(kicks), benchmark::Counter::kAvgIterations);
  if (in_flight > 1) (void)fe.poll_wait(0, static_cast<uint16_t>(kBatch * (in_flight - 1)));
  fe.close();
  (void)be.join();
}

void BM_VhostGpaRandom4K(benchmark::State& state) { run_vhost(state, false, Pattern::pipelined); }
void BM_VhostIotlbRandom4K(benchmark::State& state) { run_vhost(state, true, Pattern::pipelined); }
void BM_VhostGpaOneBatch(benchmark::State& state) { run_vhost(state, false, Pattern::one_batch); }

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
BENCHMARK(BM_VhostGpaOneBatch)->Name("vhost_blk/random_read_4k/gpa_one_batch")->UseManualTime();
BENCHMARK(BM_IotlbInvalidate)
    ->Name("vhost_blk/iotlb_invalidate")
    ->ArgName("entries")
    ->Arg(1)
    ->Arg(1000);

}  // namespace

BENCHMARK_MAIN();
