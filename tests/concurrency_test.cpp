// Concurrent map, unmap, copy, attach, detach, pin, unpin, rw and translate
// from several threads. Bounded and seeded; run under TSan in CI. The
// invariants are checked at the end: every count back to zero, and DMA
// results only ever show data that was written through the same mapping.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "iomm/access.hpp"
#include "iomm/rcu.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

constexpr uint32_t kRW = kProtRead | kProtWrite;
constexpr uint64_t kSlot = 64 * 1024;  // each slot: one mapping at a fixed IOVA
constexpr int kSlots = 16;
constexpr uint64_t kBase = 0x10000000;

TEST(Concurrency, MixedOperationsStayConsistent) {
  const unsigned seed = 20261121;
  test::Memfd mfd(kSlots * kSlot);
  auto ioas = Ioas::create({}).value();
  auto mirror = Ioas::create({}).value();
  auto domain_a = SoftDomain::create({}).value();
  auto domain_b = SoftDomain::create({}).value();
  // Keeps the file's mapping alive so host addresses are stable to check.
  const auto whole = MemorySource::from_file(mfd.fd(), 0, kSlots * kSlot).value();
  auto* const window = static_cast<std::byte*>(whole.host_address());
  ASSERT_OK(ioas->attach(domain_a));

  std::mutex pins_mu;
  std::vector<std::pair<uint64_t, uint64_t>> pins;
  std::shared_ptr<Access> access;
  access = Access::create(ioas, [&](const IovaRange& r) {
             std::lock_guard lk(pins_mu);
             std::erase_if(pins, [&](const auto& p) {
               if (!IovaRange{p.first, p.first + p.second - 1}.overlaps(r)) return false;
               EXPECT_TRUE(access->unpin(p.first, p.second).ok());
               return true;
             });
           }).value();

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> ops{0};
  auto slot_iova = [](int s) { return kBase + static_cast<uint64_t>(s) * kSlot * 2; };

  auto mapper = [&](int id) {
    std::mt19937 rng(seed + id);
    for (int i = 0; i < 300; ++i) {
      const int s = static_cast<int>(rng() % kSlots);
      auto src = MemorySource::from_file(mfd.fd(), s * kSlot, kSlot).value();
      auto m = ioas->map(src, kRW, slot_iova(s));
      if (!m.ok()) {
        EXPECT_TRUE(m.code() == EEXIST || m.code() == EBUSY) << m.error().describe();
      }
      if (rng() % 3 == 0) {
        auto c = mirror->copy_from(*ioas, slot_iova(s), kSlot, kRW, slot_iova(s));
        if (!c.ok()) {
          EXPECT_TRUE(c.code() == ENOENT || c.code() == EEXIST) << c.error().describe();
        }
      }
      auto u = ioas->unmap(slot_iova(static_cast<int>(rng() % kSlots)), kSlot);
      if (!u.ok()) {
        EXPECT_TRUE(u.code() == ENOENT || u.code() == EBUSY || u.code() == EDEADLOCK)
            << u.error().describe();
      }
      if (rng() % 4 == 0) {
        auto mu = mirror->unmap(slot_iova(static_cast<int>(rng() % kSlots)), kSlot);
        if (!mu.ok()) {
          EXPECT_TRUE(mu.code() == ENOENT || mu.code() == EBUSY);
        }
      }
      ops.fetch_add(1);
    }
  };
  auto pinner = [&] {
    std::mt19937 rng(seed + 100);
    char buf[256];
    while (!stop.load()) {
      // The access works in the first half of each slot, the device in the
      // second, so the payload bytes themselves are never raced on.
      const uint64_t iova = slot_iova(static_cast<int>(rng() % kSlots)) + (rng() % 8) * kPageSize;
      {
        std::lock_guard lk(pins_mu);
        auto r = access->pin(iova, kPageSize, kRW);
        if (r.ok()) {
          pins.emplace_back(iova, kPageSize);
          std::memset(r->front().host, 0x5a, 16);
        } else {
          EXPECT_TRUE(r.code() == ENOENT || r.code() == EINVAL) << r.error().describe();
        }
        if (pins.size() > 8) {
          EXPECT_TRUE(access->unpin(pins.front().first, pins.front().second).ok());
          pins.erase(pins.begin());
        }
      }
      auto rw = access->write(iova + 100, buf, sizeof(buf));
      if (!rw.ok()) {
        EXPECT_TRUE(rw.code() == ENOENT || rw.code() == EINVAL);
      }
      ops.fetch_add(1);
    }
  };
  auto device = [&] {
    std::mt19937 rng(seed + 200);
    char buf[512];
    while (!stop.load()) {
      // The device works in the second half of each slot, the access in the
      // first, so the payload bytes themselves are never raced on.
      const int slot = static_cast<int>(rng() % kSlots);
      const uint64_t iova = slot_iova(slot) + kSlot / 2 + rng() % (kSlot / 2 - sizeof(buf));
      SoftDomain& d = rng() % 2 ? *domain_a : *domain_b;
      auto r = rng() % 2 ? d.dma_read(iova, buf, sizeof(buf)) : d.dma_write(iova, buf, sizeof(buf));
      if (!r.ok()) {
        EXPECT_EQ(r.code(), EFAULT) << r.error().describe();
      }
      {
        RcuReadGuard guard;
        auto t = d.translate(iova, kProtRead);
        if (t.ok()) {
          // Invariant: a translation only ever points at the memory mapped there.
          EXPECT_EQ(t->host, window + slot * kSlot + (iova - slot_iova(slot)));
          volatile char c = *static_cast<const char*>(t->host);  // must be readable memory
          (void)c;
        }
      }
      d.take_faults();
      ops.fetch_add(1);
    }
  };
  auto attacher = [&] {
    for (int i = 0; i < 40 && !stop.load(); ++i) {
      ASSERT_OK(ioas->attach(domain_b));
      std::this_thread::yield();
      ASSERT_OK(ioas->detach(domain_b));
    }
  };

  std::vector<std::thread> threads;
  threads.emplace_back(mapper, 1);
  threads.emplace_back(mapper, 2);
  threads.emplace_back(pinner);
  threads.emplace_back(device);
  threads.emplace_back(attacher);
  threads[0].join();
  threads[1].join();
  stop.store(true);
  for (size_t i = 2; i < threads.size(); ++i) threads[i].join();
  EXPECT_GT(ops.load(), 600U);

  // Release everything: every count must return to zero (checked here and
  // by the after-test listener, with VmLck).
  {
    std::lock_guard lk(pins_mu);
    for (const auto& [iova, len] : pins) ASSERT_OK(access->unpin(iova, len));
    pins.clear();
  }
  access.reset();
  ASSERT_OK(ioas->unmap_all());
  ASSERT_OK(mirror->unmap_all());
  EXPECT_EQ(counters().pinned_bytes, 0U);
  ASSERT_OK(ioas->detach(domain_a));
}

}  // namespace
}  // namespace iomm
