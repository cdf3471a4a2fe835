// Accesses (seed 001): pin/unpin/rw, and the unmap callback contract.
#include "iomm/access.hpp"

#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "test_support.hpp"

namespace iomm {
namespace {

constexpr uint32_t kRW = kProtRead | kProtWrite;
constexpr uint64_t kMiB = 1 << 20;
using test::Memfd;

// A well-behaved mediated driver: records its pins under its own lock and
// drops every pin intersecting an unmapped range.
struct Driver {
  std::mutex mu;
  std::vector<std::pair<uint64_t, uint64_t>> pins;  // iova, length
  std::vector<IovaRange> notified;
  std::shared_ptr<Access> access;

  void attach(const std::shared_ptr<Ioas>& ioas) {
    auto a = Access::create(ioas, [this](const IovaRange& r) { on_unmap(r); });
    ASSERT_OK(a);
    access = a.value();
  }
  Result<std::vector<PinnedSegment>> pin(uint64_t iova, uint64_t length, uint32_t prot) {
    std::lock_guard lk(mu);
    auto r = access->pin(iova, length, prot);
    if (r.ok()) pins.emplace_back(iova, length);
    return r;
  }
  void on_unmap(const IovaRange& r) {
    std::lock_guard lk(mu);
    notified.push_back(r);
    std::erase_if(pins, [&](const auto& p) {
      if (!IovaRange{p.first, p.first + p.second - 1}.overlaps(r)) return false;
      EXPECT_TRUE(access->unpin(p.first, p.second).ok());
      return true;
    });
  }
};

struct Fixture : testing::Test {
  Memfd mfd{4 * kMiB};
  std::shared_ptr<Ioas> ioas = Ioas::create({}).value();
  MemorySource src = MemorySource::from_file(mfd.fd(), 0, 2 * kMiB).value();
  void SetUp() override {
    ASSERT_OK(ioas->map(src, kRW, 0x200000));
    ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 2 * kMiB, kMiB), kProtRead, 0x400000));
  }
};

using AccessTest = Fixture;

TEST_F(AccessTest, CallbackIsMandatory) {
  EXPECT_ERRNO(Access::create(ioas, nullptr), EINVAL);
  EXPECT_ERRNO(Access::create(nullptr, [](const IovaRange&) {}), EINVAL);
}

TEST_F(AccessTest, PinArgumentErrors) {
  Driver drv;
  drv.attach(ioas);
  EXPECT_ERRNO(drv.access->pin(0x200000, 0, kProtRead), EINVAL);
  EXPECT_ERRNO(drv.access->pin(0x200800, kPageSize, kProtRead), EINVAL);
  EXPECT_ERRNO(drv.access->pin(0x200000, 100, kProtRead), EINVAL);
  EXPECT_ERRNO(drv.access->pin(UINT64_MAX - kPageSize + 1, 2 * kPageSize, kProtRead), EOVERFLOW);
  EXPECT_ERRNO(drv.access->pin(0x200000, kPageSize, 0), EINVAL);
  EXPECT_ERRNO(drv.access->pin(0x100000, kPageSize, kProtRead), ENOENT);
  EXPECT_ERRNO(drv.access->pin(0x400000, kPageSize, kProtWrite), EPERM);
  EXPECT_ERRNO(drv.access->pin(0x4FF000, 2 * kPageSize, kProtRead), ENOENT);
  EXPECT_EQ(counters().pinned_bytes, 0U);
  EXPECT_EQ(drv.access->pin_count(), 0U);
}

TEST_F(AccessTest, PinGivesHostPointersAndSharesThePin) {
  Driver drv;
  drv.attach(ioas);
  auto segs = drv.pin(0x3FF000, 2 * kPageSize, kProtRead);  // crosses two mappings
  ASSERT_OK(segs);
  ASSERT_EQ(segs->size(), 2U);
  EXPECT_EQ((*segs)[0].host, static_cast<std::byte*>(src.host_address()) + 0x1FF000);
  EXPECT_EQ((*segs)[1].iova, 0x400000U);
  EXPECT_EQ(counters().pinned_bytes, 2 * kPageSize);
  // A domain pinning the same pages adds nothing.
  auto d = SoftDomain::create({}).value();
  ASSERT_OK(ioas->attach(d));
  EXPECT_EQ(counters().pinned_bytes, 3 * kMiB);
  ASSERT_OK(ioas->detach(d));
  EXPECT_EQ(counters().pinned_bytes, 2 * kPageSize);             // the access still holds its pages
  EXPECT_ERRNO(drv.access->unpin(0x3FF000, kPageSize), EINVAL);  // must match exactly
  EXPECT_ERRNO(drv.access->unpin(0x400000, 2 * kPageSize), EINVAL);
  ASSERT_OK(drv.access->unpin(0x3FF000, 2 * kPageSize));
  EXPECT_EQ(counters().pinned_bytes, 0U);
}

TEST_F(AccessTest, UnmapNotifiesAndTheDriverUnpins) {
  Driver drv;
  drv.attach(ioas);
  ASSERT_OK(drv.pin(0x200000, kPageSize, kRW));
  ASSERT_OK(drv.pin(0x200000, kPageSize, kProtRead));  // the same range twice
  ASSERT_OK(drv.pin(0x210000, 4 * kPageSize, kRW));
  EXPECT_EQ(counters().pinned_bytes, 5 * kPageSize);
  auto bytes = ioas->unmap(0x200000, 2 * kMiB);
  ASSERT_OK(bytes);
  EXPECT_EQ(*bytes, 2 * kMiB);
  ASSERT_EQ(drv.notified.size(), 1U);
  EXPECT_EQ(drv.notified[0], (IovaRange{0x200000, 0x3FFFFF}));
  EXPECT_EQ(drv.access->pin_count(), 0U);
  EXPECT_EQ(counters().pinned_bytes, 0U);
}

TEST_F(AccessTest, OnlyAccessesWithOverlappingPinsAreCalled) {
  Driver a;
  Driver b;
  a.attach(ioas);
  b.attach(ioas);
  ASSERT_OK(a.pin(0x200000, kPageSize, kRW));
  ASSERT_OK(b.pin(0x400000, kPageSize, kProtRead));
  ASSERT_OK(ioas->unmap(0x200000, 2 * kMiB));
  EXPECT_EQ(a.notified.size(), 1U);
  EXPECT_TRUE(b.notified.empty());
  EXPECT_EQ(b.access->pin_count(), 1U);
  ASSERT_OK(b.access->unpin(0x400000, kPageSize));
}

TEST_F(AccessTest, RefusingToUnpinEndsInEdeadlockWithNothingUnmapped) {
  int calls = 0;
  auto access = Access::create(ioas, [&](const IovaRange&) { ++calls; }).value();
  ASSERT_OK(access->pin(0x200000, kPageSize, kRW));
  EXPECT_ERRNO(ioas->unmap(0x200000, 2 * kMiB), EDEADLOCK);
  EXPECT_EQ(calls, kUnmapNotifyRetries);
  EXPECT_EQ(ioas->counters().mappings, 2U);
  EXPECT_EQ(counters().pinned_bytes, kPageSize);
  // The mapping is live again: pins, rw and a later unmap work.
  ASSERT_OK(access->pin(0x201000, kPageSize, kRW));
  char c = 'z';
  ASSERT_OK(access->write(0x200000, &c, 1));
  ASSERT_OK(access->unpin(0x200000, kPageSize));
  ASSERT_OK(access->unpin(0x201000, kPageSize));
  ASSERT_OK(ioas->unmap(0x200000, 2 * kMiB));
}

TEST_F(AccessTest, NewPinsFailWhileTheRangeIsBeingUnmapped) {
  auto other = Access::create(ioas, [](const IovaRange&) {}).value();
  std::vector<int> codes;
  std::shared_ptr<Access> probing;
  probing = Access::create(ioas, [&](const IovaRange& r) {
              codes.push_back(other->pin(r.start, kPageSize, kProtRead).code());
              char c = 0;
              codes.push_back(other->read(r.start, &c, 1).code());
              EXPECT_TRUE(probing->unpin(0x202000, kPageSize).ok());
            }).value();
  ASSERT_OK(probing->pin(0x202000, kPageSize, kProtRead));
  ASSERT_OK(ioas->unmap(0x200000, 2 * kMiB));
  EXPECT_EQ(codes, (std::vector<int>{EINVAL, EINVAL}));
  EXPECT_EQ(counters().pinned_bytes, 0U);
}

TEST_F(AccessTest, ReadWriteByIova) {
  auto access = Access::create(ioas, [](const IovaRange&) {}).value();
  std::vector<char> data(3 * kPageSize);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 7);
  // Byte-granular, across the boundary of two mappings, no pin held after.
  EXPECT_ERRNO(access->write(0x3FF800, data.data(), 4 * kPageSize), EPERM);  // second is read-only
  ASSERT_OK(access->write(0x3FE123, data.data(), 0x1000));
  std::vector<char> back(0x2000);
  ASSERT_OK(access->read(0x3FE123, back.data(), 0x2000));
  EXPECT_EQ(std::memcmp(back.data(), data.data(), 0x1000), 0);
  EXPECT_EQ(std::memcmp(static_cast<char*>(src.host_address()) + 0x1FE123, data.data(), 0x1000), 0);
  EXPECT_EQ(counters().pinned_bytes, 0U);
  EXPECT_ERRNO(access->read(0x1FF000, back.data(), 0x2000), ENOENT);
  EXPECT_ERRNO(access->read(UINT64_MAX - 1, back.data(), 8), EOVERFLOW);
  ASSERT_OK(access->read(0x200000, back.data(), 0));
  ASSERT_OK(ioas->map(*MemorySource::simulated(kMiB), kRW, 0x10000000));
  EXPECT_ERRNO(access->read(0x10000000, back.data(), 8), ENXIO);
}

TEST_F(AccessTest, DestroyUnpinsEverything) {
  {
    Driver drv;
    drv.attach(ioas);
    ASSERT_OK(drv.pin(0x200000, 16 * kPageSize, kRW));
    ASSERT_OK(drv.pin(0x400000, kPageSize, kProtRead));
    EXPECT_EQ(counters().pinned_bytes, 17 * kPageSize);
    EXPECT_EQ(ioas->counters().accesses, 1U);
  }
  EXPECT_EQ(counters().pinned_bytes, 0U);
  EXPECT_EQ(ioas->counters().accesses, 0U);
}

TEST(AccessAlignment, AccessNeedsPageAlignedMappings) {
  auto ioas = Ioas::create({}).value();
  char buf[64];
  ASSERT_OK(ioas->map(*MemorySource::from_user(buf, sizeof(buf)), kRW));
  EXPECT_ERRNO(Access::create(ioas, [](const IovaRange&) {}), EADDRINUSE);
  ASSERT_OK(ioas->unmap_all());
  auto access = Access::create(ioas, [](const IovaRange&) {});
  ASSERT_OK(access);
  EXPECT_EQ(ioas->counters().iova_alignment, kPageSize);
  EXPECT_ERRNO(ioas->map(*MemorySource::from_user(buf, sizeof(buf)), kRW), EINVAL);
}

TEST(AccessUnmap, PinConcurrentWithUnmapNeverLeaksOrHangs) {
  Memfd mfd(kMiB);
  auto ioas = Ioas::create({}).value();
  Driver drv;
  drv.attach(ioas);
  auto src = MemorySource::from_file(mfd.fd(), 0, kMiB).value();
  for (int round = 0; round < 50; ++round) {
    ASSERT_OK(ioas->map(src, kRW, 0x100000));
    std::thread pinner([&] {
      for (int i = 0; i < 20; ++i) {
        auto r = drv.pin(0x100000 + (i % 16) * kPageSize, kPageSize, kRW);
        if (!r.ok()) {
          EXPECT_TRUE(r.code() == EINVAL || r.code() == ENOENT) << r.error().describe();
        }
      }
    });
    // The driver is well behaved: however the pins race the unmap, it
    // succeeds and leaves no pin behind.
    auto bytes = ioas->unmap(0x100000, kMiB);
    pinner.join();
    ASSERT_OK(bytes);
    EXPECT_EQ(*bytes, kMiB);
    EXPECT_EQ(drv.access->pin_count(), 0U);
    EXPECT_EQ(counters().pinned_bytes, 0U);
  }
}

}  // namespace
}  // namespace iomm

namespace iomm {
namespace {

TEST(AccessUserMemory, UnmappedOrReadOnlyMemoryIsEfaultNotACrash) {
  auto* mem = static_cast<char*>(
      mmap(nullptr, 2 * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(mem, MAP_FAILED);
  ASSERT_EQ(mprotect(mem + kPageSize, kPageSize, PROT_READ), 0);
  auto ioas = Ioas::create({}).value();
  ASSERT_OK(ioas->map(*MemorySource::from_user(mem, 2 * kPageSize), kRW, 0x100000));
  auto access = Access::create(ioas, [](const IovaRange&) {}).value();
  char buf[16] = {'x'};
  ASSERT_OK(access->write(0x100000, buf, sizeof(buf)));
  EXPECT_ERRNO(access->write(0x101000, buf, sizeof(buf)), EFAULT);  // read-only page
  ASSERT_OK(access->read(0x101000, buf, sizeof(buf)));
  ASSERT_EQ(munmap(mem, 2 * kPageSize), 0);
  EXPECT_ERRNO(access->read(0x100000, buf, sizeof(buf)), EFAULT);  // gone
  EXPECT_ERRNO(access->write(0x100000, buf, sizeof(buf)), EFAULT);
}

}  // namespace
}  // namespace iomm
