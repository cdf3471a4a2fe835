// Concurrency stress with an invariant checker running throughout (TSan in
// CI). Workers map, unmap, copy, attach, detach, pin, unpin, rw, DMA and
// translate; every operation holds a shared "world" lock, and the checker
// takes it exclusively at intervals, so each check sees a quiescent state and
// can be exact:
// - the charge equals the distinct pinned pages (one owner, one file);
// - the pinned pages are exactly those the shadow says: mapped slots while a
//   domain is attached, plus access pins;
// - every translation of every attached domain points at the memory of the
//   slot its IOVA belongs to, and nothing unmapped translates.
// Seeded and bounded: IOMM_STRESS_SEED and IOMM_STRESS_ROUNDS reproduce a run.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <mutex>
#include <random>
#include <set>
#include <shared_mutex>
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

uint64_t env_or(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::strtoull(v, nullptr, 0) : fallback;
}

uint64_t slot_iova(int s) { return kBase + static_cast<uint64_t>(s) * kSlot * 2; }

class Stress : public testing::Test {
 protected:
  const uint64_t seed = env_or("IOMM_STRESS_SEED", 20261121);
  const uint64_t rounds = env_or("IOMM_STRESS_ROUNDS", 1000);
  static constexpr int kMinChecks = 20;
  test::Memfd mfd{kSlots * kSlot};
  std::shared_ptr<Ioas> ioas = Ioas::create({}).value();
  std::shared_ptr<Ioas> mirror = Ioas::create({}).value();
  std::shared_ptr<SoftDomain> domain_a = SoftDomain::create({}).value();
  std::shared_ptr<SoftDomain> domain_b = SoftDomain::create({}).value();
  // Keeps the file's mapping alive, so host addresses are stable to check.
  const MemorySource whole = MemorySource::from_file(mfd.fd(), 0, kSlots* kSlot).value();
  std::byte* const window = static_cast<std::byte*>(whole.host_address());

  std::shared_mutex world;  // shared: an operation; exclusive: a check
  std::atomic<bool> checker_waiting{false};
  std::mutex pins_mu;  // the access's own lock (pin-and-record)
  std::vector<std::pair<uint64_t, uint64_t>> pins;
  std::shared_ptr<Access> access;

  // An operation: waits while the checker wants the world, then holds it shared.
  template <typename F>
  void op(F f) {
    while (checker_waiting.load()) std::this_thread::yield();
    std::shared_lock lk(world);
    f();
  }

  void check_invariants() {
    std::set<uint64_t> expected_pages;  // file page indexes that must be pinned
    const auto maps = ioas->mappings();
    const bool has_domain = ioas->counters().domains > 0;
    for (const MappingInfo& m : maps) {
      const int s = static_cast<int>((m.iova - kBase) / (kSlot * 2));
      ASSERT_EQ(m.iova, slot_iova(s));
      if (has_domain) {
        for (uint64_t p = 0; p < kSlot / kPageSize; ++p) expected_pages.insert(s * 16 + p);
      }
    }
    {
      std::lock_guard lk(pins_mu);
      for (const auto& [iova, len] : pins) {
        const int s = static_cast<int>((iova - kBase) / (kSlot * 2));
        expected_pages.insert(s * 16 + (iova - slot_iova(s)) / kPageSize);
      }
    }
    const Counters c = counters();
    EXPECT_EQ(c.pinned_bytes, expected_pages.size() * kPageSize);
    EXPECT_EQ(c.charged_bytes, c.pinned_bytes) << "charge != distinct pinned pages";

    std::set<int> mapped;
    for (const MappingInfo& m : maps)
      mapped.insert(static_cast<int>((m.iova - kBase) / (kSlot * 2)));
    RcuReadGuard guard;
    const bool b_attached = ioas->counters().domains == 2;
    for (const auto& d : {domain_a, domain_b}) {
      const bool attached = d == domain_a || b_attached;
      for (int s = 0; s < kSlots; ++s) {
        // A page of the access's half: the device writes the other one.
        const uint64_t iova = slot_iova(s) + (s % 8) * kPageSize + 7;
        auto t = d->translate(iova, kProtRead);
        if (!attached) {
          EXPECT_FALSE(t.ok()) << "a detached domain still translates slot " << s;
        } else if (mapped.count(s)) {
          ASSERT_TRUE(t.ok()) << "slot " << s << " mapped but not translated";
          EXPECT_EQ(t->host, window + s * kSlot + (iova - slot_iova(s)));
          volatile char byte = *static_cast<const char*>(t->host);  // must be readable
          (void)byte;
        } else {
          EXPECT_FALSE(t.ok()) << "slot " << s << " unmapped but still translated";
        }
      }
      d->take_faults();
    }
  }
};

TEST_F(Stress, MixedOperationsWithInvariantChecker) {
  std::cout << "[stress] IOMM_STRESS_SEED=" << seed << " IOMM_STRESS_ROUNDS=" << rounds << "\n";
  test::WithoutIpcLock nocap;  // the checker's thread
  ASSERT_OK(set_memlock_limit(AccountMode::per_process, 0, 64 << 20));
  ASSERT_OK(ioas->attach(domain_a));
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
  auto mapper = [&](int id) {
    test::WithoutIpcLock charged;  // mappings made here are charged
    std::mt19937_64 rng(seed + id);
    for (uint64_t i = 0; i < rounds; ++i) {
      const int s = static_cast<int>(rng() % kSlots);
      op([&] {
        auto m = ioas->map(whole.slice(s * kSlot, kSlot), kRW, slot_iova(s));
        if (!m.ok()) {
          EXPECT_TRUE(m.code() == EEXIST || m.code() == EBUSY) << m.error().describe();
        }
      });
      if (rng() % 3 == 0) {
        op([&] {
          auto c = mirror->copy_from(*ioas, slot_iova(s), kSlot, kRW, slot_iova(s));
          if (!c.ok()) {
            EXPECT_TRUE(c.code() == ENOENT || c.code() == EEXIST);
          }
        });
      }
      op([&] {
        auto u = ioas->unmap(slot_iova(static_cast<int>(rng() % kSlots)), kSlot);
        if (!u.ok()) {
          EXPECT_TRUE(u.code() == ENOENT || u.code() == EBUSY) << u.error().describe();
        }
      });
      if (rng() % 4 == 0) {
        op([&] {
          auto u = mirror->unmap(slot_iova(static_cast<int>(rng() % kSlots)), kSlot);
          if (!u.ok()) {
            EXPECT_TRUE(u.code() == ENOENT || u.code() == EBUSY);
          }
        });
      }
      ops.fetch_add(1);
    }
  };
  auto pinner = [&] {
    std::mt19937_64 rng(seed + 100);
    char buf[256] = {};
    while (!stop.load()) {
      // The access works in the first half of each slot, the device in the
      // second, so the payload bytes themselves are never raced on.
      const uint64_t iova = slot_iova(static_cast<int>(rng() % kSlots)) + (rng() % 8) * kPageSize;
      op([&] {
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
      });
      op([&] {
        auto rw = access->write(iova + 100, buf, sizeof(buf));
        if (!rw.ok()) {
          EXPECT_TRUE(rw.code() == ENOENT || rw.code() == EINVAL);
        }
      });
      ops.fetch_add(1);
    }
  };
  auto device = [&] {
    std::mt19937_64 rng(seed + 200);
    char buf[512];
    while (!stop.load()) {
      const int s = static_cast<int>(rng() % kSlots);
      const uint64_t iova = slot_iova(s) + kSlot / 2 + rng() % (kSlot / 2 - sizeof(buf));
      SoftDomain& d = rng() % 2 ? *domain_a : *domain_b;
      // DMA needs no world lock: it is what the RCU grace periods protect.
      auto r = rng() % 2 ? d.dma_read(iova, buf, sizeof(buf)) : d.dma_write(iova, buf, sizeof(buf));
      if (!r.ok()) {
        EXPECT_EQ(r.code(), EFAULT) << r.error().describe();
      }
      d.take_faults();
      ops.fetch_add(1);
    }
  };
  auto attacher = [&] {
    std::mt19937_64 rng(seed + 300);
    while (!stop.load()) {
      op([&] { ASSERT_OK(ioas->attach(domain_b)); });
      std::this_thread::yield();
      op([&] { ASSERT_OK(ioas->detach(domain_b)); });
      if (rng() % 8 == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  };

  std::vector<std::thread> threads;
  threads.emplace_back(mapper, 1);
  threads.emplace_back(mapper, 2);
  threads.emplace_back(pinner);
  threads.emplace_back(device);
  threads.emplace_back(attacher);
  std::atomic<int> checks_done{0};
  std::thread checker([&] {
    while (!stop.load()) {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      checker_waiting.store(true);
      {
        std::unique_lock lk(world);
        checker_waiting.store(false);
        check_invariants();
        checks_done.fetch_add(1);
      }
    }
  });
  threads[0].join();
  threads[1].join();
  // The other workers keep going until the checker has seen enough states.
  while (checks_done.load() < kMinChecks) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  stop.store(true);
  for (size_t i = 2; i < threads.size(); ++i) threads[i].join();
  checker.join();
  check_invariants();
  std::cout << "[stress] " << ops.load() << " operations, " << checks_done.load()
            << " invariant checks\n";
  EXPECT_GE(checks_done.load(), kMinChecks);

  {
    std::lock_guard lk(pins_mu);
    for (const auto& [iova, len] : pins) ASSERT_OK(access->unpin(iova, len));
    pins.clear();
  }
  access.reset();
  ASSERT_OK(ioas->unmap_all());
  ASSERT_OK(mirror->unmap_all());
  ASSERT_OK(ioas->detach(domain_a));
}

}  // namespace
}  // namespace iomm
