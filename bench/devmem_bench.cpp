// Device memory: the owner's fault service against bare userfaultfd, first
// touch of a region against a plain memfd mapping, and pool unbind.
//
// - faults/s, single pages: a consumer thread touches every page of a fresh
//   minor-registered mapping once; the service thread answers each fault.
//   iomm: DeviceMapping::map on a 4 KiB-granularity DeviceRegion (its fault
//   service does the enable check under the region lock, the granule
//   computation and UFFDIO_CONTINUE). Baseline: the same mmap + register,
//   with a bare thread doing read(uffd) + UFFDIO_CONTINUE per page. Target
//   >= 0.9x the baseline's rate.
// - first touch in 2 MiB mode: read one byte of every 4 KiB page of a fresh
//   mapping of a populated region (one fault installs 2 MiB); baseline: the
//   same over a populated memfd with no userfaultfd (plain minor faults, with
//   the kernel's fault-around). Target <= 1.5x the baseline's time.
// - unbind of a pool with 10,000 live consumer mappings (100 allocations x
//   100 mappings): the time of P2pPool::unbind alone; no baseline.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench_util.hpp"
#include "iomm/device_region.hpp"
#include "iomm/p2p_pool.hpp"

using namespace iomm_bench;

namespace {

constexpr uint64_t kPage = 4096;

uint64_t touch_pages(const std::byte* data, uint64_t length) {
  uint64_t sum = 0;
  for (uint64_t o = 0; o < length; o += kPage) {
    sum += static_cast<uint64_t>(*static_cast<const volatile std::byte*>(data + o));
  }
  return sum;
}

// A populated memfd of `size` bytes.
int populated_memfd(uint64_t size) {
  const int fd = memfd_create("devmem-bench-baseline", MFD_CLOEXEC);
  if (fd < 0) return -1;
  if (ftruncate(fd, static_cast<off_t>(size)) != 0 ||
      fallocate(fd, 0, 0, static_cast<off_t>(size)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// The bare loop: one thread reading minor faults and answering each with
// UFFDIO_CONTINUE of the faulting page.
class BareServer {
 public:
  explicit BareServer(int uffd) : uffd_(uffd), stop_(eventfd(0, EFD_CLOEXEC)) {
    thread_ = std::thread([this] { run(); });
  }
  ~BareServer() {
    const uint64_t one = 1;
    (void)!write(stop_, &one, sizeof one);
    thread_.join();
    close(stop_);
  }

 private:
  void run() {
    pollfd fds[2] = {{uffd_, POLLIN, 0}, {stop_, POLLIN, 0}};
    uffd_msg msgs[16];
    for (;;) {
      if (poll(fds, 2, -1) < 0) continue;
      if (fds[1].revents != 0) return;
      const ssize_t n = read(uffd_, msgs, sizeof msgs);
      for (ssize_t i = 0; i < n / static_cast<ssize_t>(sizeof(uffd_msg)); ++i) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
        uffdio_continue cont{};
        cont.range = {msgs[i].arg.pagefault.address & ~(kPage - 1), kPage};
        if (ioctl(uffd_, UFFDIO_CONTINUE, &cont) != 0) {
          uffdio_range wake = cont.range;
          ioctl(uffd_, UFFDIO_WAKE, &wake);
        }
      }
    }
  }
  int uffd_;
  int stop_;
  std::thread thread_;
};

int minor_uffd() {
  int fd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (fd < 0) fd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | 1));
  if (fd < 0) return -1;
  uffdio_api api{.api = UFFD_API, .features = UFFD_FEATURE_MINOR_SHMEM, .ioctls = 0};
  if (ioctl(fd, UFFDIO_API, &api) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

constexpr uint64_t kFaultBytes = 64 * MiB;

void BM_faults_4k_bare(benchmark::State& state) {
  const int fd = populated_memfd(kFaultBytes);
  if (fd < 0) return fail(state, "memfd");
  for (auto _ : state) {
    const int uffd = minor_uffd();
    if (uffd < 0) return fail(state, "userfaultfd minor mode unavailable");
    void* p = mmap(nullptr, kFaultBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    uffdio_register reg{};
    reg.range = {reinterpret_cast<uint64_t>(p), kFaultBytes};
    reg.mode = UFFDIO_REGISTER_MODE_MINOR;
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) return fail(state, "UFFDIO_REGISTER");
    {
      BareServer server(uffd);
      benchmark::DoNotOptimize(touch_pages(static_cast<std::byte*>(p), kFaultBytes));
    }
    munmap(p, kFaultBytes);
    close(uffd);
  }
  close(fd);
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * (kFaultBytes / kPage)));
}
BENCHMARK(BM_faults_4k_bare)
    ->Name("devmem/faults_4k/bare_uffd")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

void BM_faults_4k_iomm(benchmark::State& state) {
  auto region = iomm::DeviceRegion::create(
      {.name = "devmem-bench", .size = kFaultBytes, .granularity = iomm::Granularity::page});
  if (!region) return fail(state, describe("DeviceRegion::create", region.error()));
  for (auto _ : state) {
    auto mapping = iomm::DeviceMapping::map(*region, 0, kFaultBytes);
    if (!mapping) return fail(state, describe("DeviceMapping::map", mapping.error()));
    benchmark::DoNotOptimize(touch_pages((*mapping)->data(), kFaultBytes));
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * (kFaultBytes / kPage)));
}
BENCHMARK(BM_faults_4k_iomm)
    ->Name("devmem/faults_4k/iomm")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

constexpr uint64_t kTouchBytes = 1 * GiB;

void BM_first_touch_plain(benchmark::State& state) {
  const int fd = populated_memfd(kTouchBytes);
  if (fd < 0) return fail(state, "memfd of 1 GiB");
  for (auto _ : state) {
    void* p = mmap(nullptr, kTouchBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) return fail(state, "mmap");
    benchmark::DoNotOptimize(touch_pages(static_cast<std::byte*>(p), kTouchBytes));
    munmap(p, kTouchBytes);
  }
  close(fd);
}
BENCHMARK(BM_first_touch_plain)
    ->Name("devmem/first_touch_1GiB/plain_memfd")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(5);

void BM_first_touch_iomm(benchmark::State& state) {
  auto region = iomm::DeviceRegion::create(
      {.name = "devmem-bench", .size = kTouchBytes, .granularity = iomm::Granularity::huge});
  if (!region) return fail(state, describe("DeviceRegion::create", region.error()));
  for (auto _ : state) {
    auto mapping = iomm::DeviceMapping::map(*region, 0, kTouchBytes);
    if (!mapping) return fail(state, describe("DeviceMapping::map", mapping.error()));
    benchmark::DoNotOptimize(touch_pages((*mapping)->data(), kTouchBytes));
  }
}
BENCHMARK(BM_first_touch_iomm)
    ->Name("devmem/first_touch_1GiB/iomm_2M")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(5);

void BM_unbind_10k_mappings(benchmark::State& state) {
  constexpr int kAllocations = 100;
  constexpr int kMappingsEach = 100;
  // 10,000 userfaultfds and 200 memfds.
  rlimit files{};
  getrlimit(RLIMIT_NOFILE, &files);
  files.rlim_cur = files.rlim_max;
  setrlimit(RLIMIT_NOFILE, &files);
  for (auto _ : state) {
    state.PauseTiming();
    auto pool = iomm::P2pPool::create({.name = "devmem-bench", .size = kAllocations * kPage});
    if (!pool) return fail(state, describe("P2pPool::create", pool.error()));
    std::vector<std::unique_ptr<iomm::DeviceMapping>> mappings;
    mappings.reserve(kAllocations * kMappingsEach);
    for (int a = 0; a < kAllocations; ++a) {
      auto block = (*pool)->allocate(kPage);
      if (!block) return fail(state, describe("allocate", block.error()));
      for (int m = 0; m < kMappingsEach; ++m) {
        auto mapping = iomm::DeviceMapping::map((*block)->region(), 0, kPage);
        if (!mapping) return fail(state, describe("DeviceMapping::map", mapping.error()));
        benchmark::DoNotOptimize(touch_pages((*mapping)->data(), kPage));
        mappings.push_back(std::move(mapping).value());
      }
    }
    state.ResumeTiming();
    if (auto st = (*pool)->unbind(); !st) return fail(state, describe("unbind", st.error()));
    state.PauseTiming();
    mappings.clear();
    pool->reset();
    state.ResumeTiming();
  }
}
BENCHMARK(BM_unbind_10k_mappings)
    ->Name("devmem/unbind_10k_mappings")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(3);

}  // namespace

BENCHMARK_MAIN();
