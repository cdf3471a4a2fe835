// Invalidation costs.
//
// - BM_InvalidateSource/N: one invalidation of a memfd source's whole range
//   (notify::invalidate_source, what the memory monitor calls for an event)
//   with N interval notifiers watching it, from the call to every callback
//   done (each callback records the sequence, as a consumer does). N = 1 and
//   1000. No baseline: reported.
// - BM_MunmapWatched vs BM_MunmapBare: one 64 KiB anonymous mapping, a page
//   touched, an IntervalNotifier over it (watch_source), then munmap. The
//   watched variant also holds a MemoryWatch (userfaultfd registration), so
//   the munmap queues an UNMAP event and sleeps until the monitor thread has
//   read it, and the monitor delivers the invalidation to the notifier;
//   the bare one drops its watch before munmap (registration and
//   unregistration are paid in both). The difference is what the event path
//   adds to a munmap.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench_util.hpp"
#include "iomm/memory_monitor.hpp"
#include "iomm/notifier.hpp"
#include "iomm/source.hpp"
#include "monitor/process_monitor.hpp"  // internal: settle the monitor
#include "notify/invalidate.hpp"        // internal: the event sources' entry point

using namespace iomm_bench;

namespace {

constexpr uint64_t kLen = 64 * KiB;

bool record(iomm::IntervalNotifier& n, const iomm::Invalidation&, uint64_t seq) {
  n.set_seq(seq);
  return true;
}

void BM_InvalidateSource(benchmark::State& state) {
  const int fd = memfd_create("iomm-bench-notify", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0 || ftruncate(fd, kLen) != 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) != 0) {
    return fail(state, std::string("memfd: ") + std::strerror(errno));
  }
  auto src = iomm::MemorySource::from_file(fd, 0, kLen);
  if (!src) return fail(state, describe("from_file", src.error()));
  std::vector<std::unique_ptr<iomm::IntervalNotifier>> notifiers;
  for (int64_t i = 0; i < state.range(0); ++i) {
    auto n = iomm::IntervalNotifier::watch_source(*src, record);
    if (!n) return fail(state, describe("watch_source", n.error()));
    notifiers.push_back(std::move(n).value());
  }
  for (auto _ : state) {
    iomm::notify::invalidate_source(*src->object(), {src->offset(), src->offset() + kLen - 1},
                                    iomm::InvalidationCause::truncate);
  }
  if (notifiers.front()->invalidations() != static_cast<uint64_t>(state.iterations())) {
    fail(state, "a notifier missed invalidations");
  }
  notifiers.clear();
  close(fd);
}

void munmap_cycle(benchmark::State& state, bool watched) {
  uint64_t before = iomm::memory_monitor_stats().unmaps;
  for (auto _ : state) {
    void* p = mmap(nullptr, kLen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return fail(state, "mmap failed");
    static_cast<volatile char*>(p)[0] = 1;
    auto src = iomm::MemorySource::from_user(p, kLen);
    auto n = iomm::IntervalNotifier::watch_source(*src, record);
    if (!n) return fail(state, describe("watch_source", n.error()));
    auto w = iomm::MemoryWatch::create(*src);
    if (!w) return fail(state, describe("MemoryWatch::create", w.error()));
    if (!watched) w->reset();
    munmap(p, kLen);
    // munmap returns once the monitor has read the event; this waits for
    // the invalidation to reach the notifier.
    if (auto s = iomm::monitor::settle_user_copies(); !s) return fail(state, "settle failed");
    if (watched && (*n)->invalidations() != 1) return fail(state, "no invalidation");
  }
  const uint64_t events = iomm::memory_monitor_stats().unmaps - before;
  if (watched && events != static_cast<uint64_t>(state.iterations())) {
    fail(state, "missed unmap events");
  }
}

void BM_MunmapBare(benchmark::State& state) { munmap_cycle(state, false); }
void BM_MunmapWatched(benchmark::State& state) { munmap_cycle(state, true); }

}  // namespace

BENCHMARK(BM_InvalidateSource)->Arg(1)->Arg(1000);
BENCHMARK(BM_MunmapBare);
BENCHMARK(BM_MunmapWatched);

BENCHMARK_MAIN();
