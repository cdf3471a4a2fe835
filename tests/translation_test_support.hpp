// Shared by the translation tests (iotlb_test.cpp, translate_many_test.cpp):
// a software domain whose page table is filled directly with synthetic host
// addresses, and the unmap-while-translating stress harness both use.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "domain/page_table.hpp"
#include "domain/soft_domain_impl.hpp"
#include "iomm/domain.hpp"
#include "iomm/translation_cache.hpp"
#include "test_support.hpp"

namespace iomm::test {

inline constexpr uint32_t kReadWrite = kProtRead | kProtWrite;
// Addresses are never dereferenced by a translation: synthetic ones will do.
inline constexpr uint64_t kHostA = 0x7000000000;
inline constexpr uint64_t kHostB = 0x7100000000;

inline std::shared_ptr<SoftDomain> make_domain(const DomainConfig& config = {}) {
  auto domain = SoftDomain::create(config);
  EXPECT_TRUE(domain.ok());
  return std::move(domain).value();
}

inline std::unique_ptr<TranslationCache> make_cache(std::shared_ptr<SoftDomain> domain) {
  auto cache = TranslationCache::create(std::move(domain));
  EXPECT_TRUE(cache.ok());
  return std::move(cache).value();
}

inline Status map(SoftDomain& domain, uint64_t iova, uint64_t address, uint64_t length,
                  uint32_t prot, mem::HostAccess access = mem::HostAccess::direct) {
  return domain::page_table_of(domain).map(iova, address, length, prot, access);
}

// Readers, each with its own cache, hammer a small set of pages (so nearly
// every lookup is a cache hit) while a writer unmaps them one by one,
// publishing how many it has unmapped after each unmap returns; then maps
// them all again at new addresses, round after round. A translation that
// began after page i's unmap returned must fail with EFAULT, and every
// translation must be the current round's address: no stale hit, ever.
class UnmapRounds {
 public:
  static constexpr uint64_t kPages = 64;
  static constexpr uint64_t kRounds = 10;
  static constexpr uint64_t kBase = 0x200000;
  static constexpr int kReaders = 2;

  // What a reader's translation step reports through.
  class Lookup {
   public:
    // The writer's progress before and after the translation, which must
    // fall between the two calls.
    void begin() { before_ = owner_.state_.load(std::memory_order_seq_cst); }
    void end() {
      after_ = owner_.state_.load(std::memory_order_seq_cst);
      owner_.steps_.fetch_add(1, std::memory_order_relaxed);
    }
    // A failed translation: only EFAULT is right.
    void failed(int code) {
      if (code != EFAULT) owner_.wrong_.fetch_add(1);
    }
    // A translation of page's IOVA + 8 to address.
    void translated(uint64_t page, uint64_t address) {
      if ((before_ >> 32) != (after_ >> 32)) return;  // a remap may have happened
      const uint64_t round = before_ >> 32;
      if (page < (before_ & 0xffffffff)) owner_.stale_.fetch_add(1);
      if (address != UnmapRounds::address(round, page) + 8) owner_.wrong_.fetch_add(1);
      owner_.checked_.fetch_add(1, std::memory_order_relaxed);
    }

   private:
    friend class UnmapRounds;
    explicit Lookup(UnmapRounds& owner) : owner_(owner) {}
    UnmapRounds& owner_;
    uint64_t before_ = 0;
    uint64_t after_ = 0;
  };

  // step(cache, next_page, lookup): one translation step of a reader
  // through its cache; next_page() gives the next pseudo-random page.
  using Step = std::function<void(TranslationCache&, const std::function<uint64_t()>&, Lookup&)>;

  // Runs the rounds; the writer waits for steps_per_unmap reader steps
  // before each unmap, so that readers hit every state.
  void run(const Step& step, uint64_t steps_per_unmap) {
    auto domain = make_domain();
    domain::PageTable& table = domain::page_table_of(*domain);
    std::vector<std::unique_ptr<TranslationCache>> caches;
    for (int r = 0; r < kReaders; ++r) caches.push_back(make_cache(domain));
    std::atomic<bool> done{false};
    std::vector<std::thread> readers;
    for (int r = 0; r < kReaders; ++r) {
      readers.emplace_back([&, r] {
        uint64_t x = 0x9e3779b97f4a7c15ULL * static_cast<uint64_t>(r + 1);
        const std::function<uint64_t()> next_page = [&x] {
          x ^= x << 13;
          x ^= x >> 7;
          x ^= x << 17;
          return x % kPages;
        };
        Lookup lookup(*this);
        while (!done.load(std::memory_order_acquire)) step(*caches[r], next_page, lookup);
      });
    }
    auto wait_for_steps = [&] {
      const uint64_t target = steps_.load() + steps_per_unmap;
      while (steps_.load() < target) std::this_thread::yield();
    };
    for (uint64_t round = 0; round < kRounds; ++round) {
      // The new round is published before its maps: a reader that saw the
      // old round before and after its lookup looked up before these maps.
      state_.store(round << 32, std::memory_order_seq_cst);
      for (uint64_t page = 0; page < kPages; ++page) {
        EXPECT_OK(
            map(*domain, kBase + page * kPageSize, address(round, page), kPageSize, kProtRead));
      }
      for (uint64_t page = 0; page < kPages; ++page) {
        wait_for_steps();
        EXPECT_EQ(table.unmap(kBase + page * kPageSize, kPageSize), kPageSize);
        state_.store(round << 32 | (page + 1), std::memory_order_seq_cst);
      }
    }
    done.store(true, std::memory_order_release);
    for (auto& reader : readers) reader.join();
    EXPECT_EQ(stale_.load(), 0U);
    EXPECT_EQ(wrong_.load(), 0U);
    EXPECT_GT(checked_.load(), 0U);
    EXPECT_EQ(domain->counters().mapped_bytes, 0U);
    (void)domain->take_faults();
  }

  static uint64_t address(uint64_t round, uint64_t page) {
    return kHostA + round * (kPages * kPageSize) + page * kPageSize;
  }

 private:
  // round << 32 | pages of the round unmapped so far.
  std::atomic<uint64_t> state_{0};
  std::atomic<uint64_t> steps_{0};
  std::atomic<uint64_t> stale_{0};
  std::atomic<uint64_t> wrong_{0};
  std::atomic<uint64_t> checked_{0};
};

}  // namespace iomm::test

// Both translation tests name these unqualified, inside namespace iomm.
namespace iomm {
using test::kHostA;
using test::kHostB;
using test::kReadWrite;
using test::make_cache;
using test::make_domain;
using test::map;
using test::UnmapRounds;
}  // namespace iomm
