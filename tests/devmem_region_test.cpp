// Device regions: the fault service under concurrent faults from threads
// and a child process, memory disable/enable during a storm, private
// mapping refusal, fork of a consumer, consumers hanging up.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "devmem/region_state.hpp"
#include "devmem/uffd.hpp"
#include "devmem/wire.hpp"
#include "devmem_test_support.hpp"
#include "iomm/device_region.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

using test::device_word;
using test::probe_read;
using test::probe_write;

constexpr uint64_t kPage = 4096;
constexpr uint64_t kHuge = 2ULL << 20;

bool uffd_minor_available() { return devmem::open_minor_uffd().ok(); }

#define NEEDS_UFFD() IOMM_NEEDS(uffd_minor_available(), "userfaultfd minor faults on shmem")

std::shared_ptr<DeviceRegion> make_region(uint64_t size, Granularity g, uint64_t generation = 0) {
  auto region = DeviceRegion::create({.name = "devmem-test", .size = size, .granularity = g});
  EXPECT_TRUE(region.ok()) << region.error().describe();
  if (!region.ok()) return nullptr;
  std::vector<uint64_t> words(size / 8);
  for (uint64_t i = 0; i < words.size(); ++i) words[i] = device_word(i * 8, generation);
  EXPECT_OK((*region)->write(0, words.data(), size));
  return *region;
}

// Every word of [data, +length) read through the mapping is the device's.
uint64_t count_bad_words(const std::byte* data, uint64_t offset, uint64_t length,
                         uint64_t generation) {
  uint64_t bad = 0;
  for (uint64_t o = 0; o < length; o += 8) {
    const uint64_t v = *reinterpret_cast<const volatile uint64_t*>(data + o);
    if (v != device_word(offset + o, generation)) ++bad;
  }
  return bad;
}

// The service thread counts an install after the kernel has woken the
// faulting thread, so a counter may lag the touch that caused it: wait
// (bounded) for it to settle.
RegionCounters settled_counters(const DeviceRegion& region, uint64_t installed_bytes) {
  RegionCounters c = region.counters();
  for (int i = 0; i < 5000 && c.installed_bytes < installed_bytes; ++i) {
    usleep(1000);
    c = region.counters();
  }
  return c;
}

// A child process that maps the region through the socket and checks it.
// Returns its pid; it waits for a byte on `go` before touching anything.
pid_t spawn_remote_checker(int sock, int go, const ExportedRegion& exported, uint64_t length) {
  const pid_t pid = fork();
  if (pid != 0) return pid;
  char c;
  if (read(go, &c, 1) != 1) _exit(10);
  auto mapping = DeviceMapping::map_remote(sock, exported, 0, length);
  if (!mapping.ok()) _exit(11);
  // Touch pages in a different order from the threads: back to front.
  for (uint64_t p = length; p > 0; p -= kPage) {
    const uint64_t o = p - kPage;
    for (uint64_t w = 0; w < kPage; w += 8) {
      if (*reinterpret_cast<const volatile uint64_t*>((*mapping)->data() + o + w) !=
          device_word(o + w, 0)) {
        _exit(12);
      }
    }
  }
  mapping->reset();
  _exit(0);
}

void fault_storm(Granularity granularity) {
  constexpr uint64_t kSize = 8ULL << 20;
  auto region = make_region(kSize, granularity);
  ASSERT_TRUE(region);
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
  int go[2];
  ASSERT_EQ(pipe(go), 0);
  const pid_t child = spawn_remote_checker(sv[1], go[0], region->exported(), kSize);
  ASSERT_GT(child, 0);
  close(sv[1]);
  close(go[0]);
  ASSERT_OK(region->serve(sv[0]));

  auto shared = DeviceMapping::map(region, 0, kSize);
  ASSERT_OK(shared);
  auto second = DeviceMapping::map(region, 0, kSize);
  ASSERT_OK(second);
  ASSERT_EQ(write(go[1], "g", 1), 1);
  close(go[1]);

  constexpr int kThreads = 4;
  std::atomic<uint64_t> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      // Two threads per mapping, walking the same pages in the same order,
      // so most faults race another on the same page.
      const std::byte* data = (t % 2 == 0 ? *shared : *second)->data();
      bad += count_bad_words(data, 0, kSize, 0);
    });
  }
  for (auto& th : threads) th.join();
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
  EXPECT_EQ(bad.load(), 0u);
  const RegionCounters c = settled_counters(*region, 3 * kSize);
  EXPECT_GT(c.faults, 0u);
  EXPECT_EQ(c.refused, 0u);
  // Each page was installed into each of the three mappings exactly once.
  EXPECT_EQ(c.installed_bytes, 3 * kSize);
}

TEST(DevmemRegion, FaultStormEveryByteIsTheDevices) {
  NEEDS_UFFD();
  fault_storm(Granularity::page);
}

TEST(DevmemRegion, FaultStormWithHugeGranularity) {
  NEEDS_UFFD();
  fault_storm(Granularity::huge);
}

TEST(DevmemRegion, GranularityDecidesHowMuchOneFaultInstalls) {
  NEEDS_UFFD();
  for (Granularity g : {Granularity::page, Granularity::huge}) {
    auto region = make_region(2 * kHuge, g);
    ASSERT_TRUE(region);
    auto mapping = DeviceMapping::map(region, 0, 2 * kHuge);
    ASSERT_OK(mapping);
    EXPECT_EQ(count_bad_words((*mapping)->data(), 0, kHuge, 0), 0u);
    const RegionCounters c = settled_counters(*region, kHuge);
    const uint64_t expected_faults = g == Granularity::page ? kHuge / kPage : 1;
    EXPECT_EQ(c.faults, expected_faults);
    EXPECT_EQ(c.installed_bytes, kHuge);
    EXPECT_EQ(c.mappings, 1u);
    mapping->reset();
    EXPECT_EQ(region->counters().mappings, 0u);
  }
}

TEST(DevmemRegion, DisableDuringStormSigbusesThenEnableRestores) {
  NEEDS_UFFD();
  constexpr uint64_t kSize = 4ULL << 20;
  auto region = make_region(kSize, Granularity::page);
  ASSERT_TRUE(region);
  auto mapping = DeviceMapping::map(region, 0, kSize);
  ASSERT_OK(mapping);
  std::byte* const data = (*mapping)->data();

  // 0: enabled; 1: disable returned; 3: enable running; 2: enable returned.
  std::atomic<int> phase{0};
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> reads{0};
  std::atomic<uint64_t> wrong{0};                // data that is not the device's
  std::atomic<uint64_t> data_while_disabled{0};  // reads that succeeded after the zap
  std::atomic<uint64_t> sigbus_while_disabled{0};
  std::atomic<uint64_t> sigbus_after_enable{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t) {
    threads.emplace_back([&, t] {
      uint64_t o = static_cast<uint64_t>(t) * 8 * 1024;
      while (!stop.load()) {
        const int before = phase.load(std::memory_order_acquire);
        uint64_t v = 0;
        const bool ok = probe_read(data + o, &v);
        // The access lies inside the disabled window only if the phase was
        // 1 both before and after it.
        const bool inside_disabled = before == 1 && phase.load(std::memory_order_acquire) == 1;
        const uint64_t generation = before == 2 ? 1 : 0;
        if (ok) {
          // Before the enable returned both generations are possible only
          // if the read raced the enable; after it, only the new one.
          if (v != device_word(o, generation) && v != device_word(o, 1 - generation)) ++wrong;
          if (before == 2 && v != device_word(o, 1)) ++wrong;
          if (inside_disabled) ++data_while_disabled;
        } else if (inside_disabled) {
          ++sigbus_while_disabled;
        } else if (before == 2) {
          ++sigbus_after_enable;
        }
        ++reads;
        o = (o + 4096 + 8) % kSize & ~7ULL;
      }
    });
  }
  while (reads.load() < 2000) std::this_thread::yield();
  ASSERT_OK(region->set_memory_enabled(false));
  EXPECT_FALSE(region->memory_enabled());
  phase.store(1, std::memory_order_release);
  const uint64_t at_disable = reads.load();
  while (reads.load() < at_disable + 2000) std::this_thread::yield();
  // The device rewrites its memory while decode is off.
  std::vector<uint64_t> words(kSize / 8);
  for (uint64_t i = 0; i < words.size(); ++i) words[i] = device_word(i * 8, 1);
  ASSERT_OK(region->write(0, words.data(), kSize));
  phase.store(3, std::memory_order_release);
  ASSERT_OK(region->set_memory_enabled(true));
  phase.store(2, std::memory_order_release);
  const uint64_t at_enable = reads.load();
  while (reads.load() < at_enable + 2000) std::this_thread::yield();
  stop = true;
  for (auto& th : threads) th.join();

  EXPECT_EQ(wrong.load(), 0u);
  EXPECT_EQ(data_while_disabled.load(), 0u);
  EXPECT_GT(sigbus_while_disabled.load(), 0u);
  EXPECT_EQ(sigbus_after_enable.load(), 0u);
  EXPECT_EQ(count_bad_words(data, 0, kSize, 1), 0u);
}

TEST(DevmemRegion, ContentsSurviveDisableEnableUnlessReset) {
  NEEDS_UFFD();
  constexpr uint64_t kSize = 1ULL << 20;
  auto region = make_region(kSize, Granularity::huge);
  ASSERT_TRUE(region);
  auto mapping = DeviceMapping::map(region, 0, kSize);
  ASSERT_OK(mapping);
  std::byte* const data = (*mapping)->data();
  ASSERT_TRUE(probe_write(data + 64, 0x1234));
  ASSERT_OK(region->set_memory_enabled(false));
  uint64_t v = 0;
  EXPECT_FALSE(probe_read(data + 64, &v));
  EXPECT_FALSE(probe_write(data + 128, 1));
  // The device still sees its memory (and the consumer's last store).
  ASSERT_OK(region->read(64, &v, sizeof v));
  EXPECT_EQ(v, 0x1234u);
  EXPECT_OK(region->set_memory_enabled(false));  // idempotent
  ASSERT_OK(region->set_memory_enabled(true));
  ASSERT_TRUE(probe_read(data + 64, &v));
  EXPECT_EQ(v, 0x1234u);
  EXPECT_EQ(count_bad_words(data + 4096, 4096, kSize - 4096, 0), 0u);
  ASSERT_OK(region->reset());
  ASSERT_TRUE(probe_read(data + 64, &v));
  EXPECT_EQ(v, 0u);
}

TEST(DevmemRegion, RevokedRegionAnswersFaultsWithPoison) {
  NEEDS_UFFD();
  const auto features = devmem::kernel_features();
  IOMM_NEEDS(features.ok() && (*features & UFFD_FEATURE_POISON) != 0,
             "UFFDIO_POISON (Linux 6.6 or later)");
  auto region = make_region(64 * 1024, Granularity::page);
  ASSERT_TRUE(region);
  auto mapping = DeviceMapping::map(region, 0, 64 * 1024);
  ASSERT_OK(mapping);
  uint64_t v = 0;
  ASSERT_TRUE(probe_read((*mapping)->data(), &v));
  // Between a pool unbind's stop and its zap the view still holds its
  // pages: a first touch then is a minor fault the service must refuse.
  region->state().stop();
  EXPECT_FALSE(probe_read((*mapping)->data() + kPage, &v));
  EXPECT_EQ(region->counters().refused, 1u);
  // The marker stays: the same page faults no more.
  EXPECT_FALSE(probe_read((*mapping)->data() + kPage, &v));
  EXPECT_EQ(region->counters().refused, 1u);
  // Installed before the stop: still mapped until the zap.
  EXPECT_TRUE(probe_read((*mapping)->data(), &v));
  region->state().zap();
  EXPECT_FALSE(probe_read((*mapping)->data(), &v));
  EXPECT_ERRNO(region->set_memory_enabled(true), ENODEV);
}

TEST(DevmemRegion, PrivateMappingIsRefused) {
  NEEDS_UFFD();
  auto region = make_region(1ULL << 20, Granularity::page);
  ASSERT_TRUE(region);
  auto refused = DeviceMapping::map(region, 0, 1ULL << 20, MapMode::private_copy_on_write);
  EXPECT_ERRNO(refused, EINVAL);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.error().message().find("private"), std::string::npos);

  // A consumer that maps privately anyway and registers it is refused by
  // the owner, which reads its VMA.
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
  ASSERT_OK(region->serve(sv[0]));
  void* priv =
      mmap(nullptr, 1ULL << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE, region->exported().fd, 0);
  ASSERT_NE(priv, MAP_FAILED);
  auto uffd = devmem::open_minor_uffd();
  ASSERT_OK(uffd);
  uffdio_register reg{};
  reg.range = {reinterpret_cast<uint64_t>(priv), 1ULL << 20};
  reg.mode = UFFDIO_REGISTER_MODE_MINOR;
  ASSERT_EQ(ioctl(uffd->fd, UFFDIO_REGISTER, &reg), 0) << strerror(errno);
  devmem::wire::Request req;
  req.op = devmem::wire::kMap;
  req.address = reinterpret_cast<uint64_t>(priv);
  req.length = 1ULL << 20;
  req.features = uffd->features;
  ASSERT_TRUE(devmem::wire::send_packet(sv[1], &req, sizeof req, uffd->fd));
  devmem::wire::Reply reply;
  int fd = -1;
  pid_t pid = 0;
  ASSERT_EQ(devmem::wire::recv_packet(sv[1], &reply, sizeof reply, &fd, &pid), 0);
  EXPECT_EQ(reply.error, EINVAL);
  EXPECT_NE(std::strstr(reply.message, "private"), nullptr) << reply.message;
  EXPECT_EQ(region->counters().mappings, 0u);
  close(uffd->fd);
  munmap(priv, 1ULL << 20);
  close(sv[1]);
}

TEST(DevmemRegion, BadRangesAreRefused) {
  NEEDS_UFFD();
  auto region = make_region(1ULL << 20, Granularity::page);
  ASSERT_TRUE(region);
  EXPECT_ERRNO(DeviceMapping::map(region, 0, 0), EINVAL);
  EXPECT_ERRNO(DeviceMapping::map(region, 100, kPage), EINVAL);
  EXPECT_ERRNO(DeviceMapping::map(region, kPage, 1ULL << 20), EINVAL);
  EXPECT_ERRNO(DeviceRegion::create({.size = 0}), EINVAL);
  EXPECT_ERRNO(DeviceRegion::create({.size = 100}), EINVAL);
  uint64_t v;
  EXPECT_ERRNO(region->read(1ULL << 20, &v, 8), EINVAL);
  EXPECT_EQ(region->counters().mappings, 0u);
}

TEST(DevmemRegion, ForkedConsumerIsCoveredByTheZap) {
  NEEDS_UFFD();
  constexpr uint64_t kSize = 256 * 1024;
  auto region = make_region(kSize, Granularity::page);
  ASSERT_TRUE(region);
  auto mapping = DeviceMapping::map(region, 0, kSize);
  ASSERT_OK(mapping);
  std::byte* const data = (*mapping)->data();
  ASSERT_EQ(count_bad_words(data, 0, kPage, 0), 0u);  // installed in the parent

  int to_child[2];
  int to_parent[2];
  ASSERT_EQ(pipe(to_child), 0);
  ASSERT_EQ(pipe(to_parent), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // The child's copy of the mapping is not registered (no fork events
    // without CAP_SYS_PTRACE): it reaches the view directly.
    char c;
    uint64_t v = 0;
    const bool before = probe_read(data + 2 * kPage, &v) && v == device_word(2 * kPage, 0);
    if (write(to_parent[1], "1", 1) != 1 || read(to_child[0], &c, 1) != 1) _exit(20);
    const bool disabled = !probe_read(data + 3 * kPage, &v) && !probe_read(data, &v);
    if (write(to_parent[1], "2", 1) != 1 || read(to_child[0], &c, 1) != 1) _exit(21);
    const bool after = probe_read(data + 3 * kPage, &v) && v == device_word(3 * kPage, 0);
    _exit(before ? (disabled ? (after ? 0 : 3) : 2) : 1);
  }
  char c;
  ASSERT_EQ(read(to_parent[0], &c, 1), 1);
  ASSERT_OK(region->set_memory_enabled(false));
  ASSERT_EQ(write(to_child[1], "d", 1), 1);
  ASSERT_EQ(read(to_parent[0], &c, 1), 1);
  ASSERT_OK(region->set_memory_enabled(true));
  ASSERT_EQ(write(to_child[1], "e", 1), 1);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 0) << "1: no data before, 2: no SIGBUS while disabled, 3: no "
                                       "data after enable";
  EXPECT_EQ(count_bad_words(data, 0, kSize, 0), 0u);
  for (int fd : {to_child[0], to_child[1], to_parent[0], to_parent[1]}) close(fd);
}

TEST(DevmemRegion, RemoteConsumerHangingUpIsForgotten) {
  NEEDS_UFFD();
  constexpr uint64_t kSize = 64 * 1024;
  auto region = make_region(kSize, Granularity::page);
  ASSERT_TRUE(region);
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
  ASSERT_OK(send_region(sv[0], region->exported()));
  ASSERT_OK(region->serve(sv[0]));
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto exported = receive_region(sv[1]);
    if (!exported.ok()) _exit(1);
    auto mapping = DeviceMapping::map_remote(sv[1], *exported, 0, kSize);
    if (!mapping.ok()) _exit(2);
    if (count_bad_words((*mapping)->data(), 0, kSize, 0) != 0) _exit(3);
    _exit(0);  // without unmapping or saying goodbye
  }
  close(sv[1]);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  // The hang-up is handled on the service thread; bounded wait for it.
  for (int i = 0; i < 5000 && region->counters().mappings != 0; ++i) usleep(1000);
  EXPECT_EQ(region->counters().mappings, 0u);
  EXPECT_EQ(settled_counters(*region, kSize).installed_bytes, kSize);
}

}  // namespace
}  // namespace iomm
