// The software domains' translation cache (include/iomm/translation_cache.hpp,
// src/domain/iotlb.hpp): a hit gives what the walk gives, and every unmap or
// replacement is seen by the next lookup, from any thread.
#include <gtest/gtest.h>

#include <cerrno>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "domain/page_table.hpp"
#include "domain/soft_domain_impl.hpp"
#include "iomm/domain.hpp"
#include "iomm/ioas.hpp"
#include "iomm/source.hpp"
#include "iomm/translation_cache.hpp"
#include "test_support.hpp"
#include "translation_test_support.hpp"

namespace iomm {
namespace {

void expect_same(const Translation& a, const Translation& b) {
  EXPECT_EQ(a.iova, b.iova);
  EXPECT_EQ(a.host, b.host);
  EXPECT_EQ(a.address, b.address);
  EXPECT_EQ(a.prot, b.prot);
  EXPECT_EQ(a.leaf_size, b.leaf_size);
  EXPECT_EQ(a.contiguous, b.contiguous);
}

TEST(Iotlb, CreateNeedsADomain) { EXPECT_ERRNO(TranslationCache::create(nullptr), EINVAL); }

TEST(Iotlb, HitGivesWhatTheWalkGives) {
  auto domain = make_domain();
  auto cache = make_cache(domain);
  ASSERT_OK(map(*domain, 0x10000, kHostA, 2 * kPageSize, kProtRead));
  ASSERT_OK(map(*domain, kPageSize2M, kHostB, kPageSize2M, kReadWrite));  // one 2 MiB leaf
  for (uint64_t iova : {uint64_t{0x10000}, uint64_t{0x11abc}, kPageSize2M + 0x12345}) {
    auto walk = domain->translate(iova, kProtRead);
    ASSERT_OK(walk);
    auto fill = cache->translate(iova, kProtRead);  // misses, fills
    auto hit = cache->translate(iova, kProtRead);   // hits
    ASSERT_OK(fill);
    ASSERT_OK(hit);
    expect_same(*fill, *walk);
    expect_same(*hit, *walk);
  }
  auto large = cache->translate(kPageSize2M + 0x12345, kProtWrite);
  ASSERT_OK(large);
  EXPECT_EQ(large->leaf_size, kPageSize2M);
  EXPECT_EQ(large->contiguous, kPageSize2M - 0x12345);
  EXPECT_EQ(large->address, kHostB + 0x12345);
  // Simulated memory has no host pointer, cached or not.
  ASSERT_OK(domain::page_table_of(*domain).map(0x80000, kHostA, kPageSize, kProtRead,
                                               mem::HostAccess::none));
  for (int i = 0; i < 2; ++i) {
    auto t = cache->translate(0x80010, kProtRead);
    ASSERT_OK(t);
    EXPECT_EQ(t->host, nullptr);
    EXPECT_EQ(t->address, kHostA + 0x10);
  }
  // A bad access is EINVAL on a hit too.
  EXPECT_ERRNO(cache->translate(0x10000, 0), EINVAL);
  EXPECT_ERRNO(cache->translate(0x10000, 4), EINVAL);
  EXPECT_TRUE(domain->take_faults().empty());
}

// A page only partly inside the aperture is never cached: the bytes outside
// fault on every lookup.
TEST(Iotlb, ApertureIsCheckedOnEveryLookup) {
  DomainConfig config;
  config.aperture_start = 0x10800;
  auto domain = make_domain(config);
  auto cache = make_cache(domain);
  ASSERT_OK(map(*domain, 0x10000, kHostA, kPageSize, kProtRead));
  for (int i = 0; i < 2; ++i) {
    ASSERT_OK(cache->translate(0x10900, kProtRead));
    EXPECT_ERRNO(cache->translate(0x10100, kProtRead), EFAULT);
  }
  const auto faults = domain->take_faults();
  ASSERT_EQ(faults.size(), 2U);
  EXPECT_EQ(faults[1].reason, FaultReason::outside_aperture);
}

TEST(Iotlb, UnmapIsSeenByTheNextLookup) {
  auto domain = make_domain();
  auto cache = make_cache(domain);
  ASSERT_OK(map(*domain, 0x40000, kHostA, kPageSize, kReadWrite));
  ASSERT_OK(cache->translate(0x40000, kProtRead));
  ASSERT_OK(cache->translate(0x40010, kProtRead));  // a hit
  EXPECT_EQ(domain::page_table_of(*domain).unmap(0x40000, kPageSize), kPageSize);
  EXPECT_ERRNO(cache->translate(0x40010, kProtRead), EFAULT);
  const auto faults = domain->take_faults();
  ASSERT_EQ(faults.size(), 1U);
  EXPECT_EQ(faults[0].reason, FaultReason::not_present);
  EXPECT_EQ(faults[0].iova, 0x40010U);
}

// Every cache of the domain is registered from create() to its destruction,
// and each unmap empties all of them before it returns, whatever order they
// were created and destroyed in; a cache of another domain keeps its entries.
TEST(Iotlb, AnUnmapEmptiesEveryCacheOfTheDomain) {
  auto domain = make_domain();
  auto other_domain = make_domain();
  ASSERT_OK(map(*domain, 0x40000, kHostA, 2 * kPageSize, kReadWrite));
  ASSERT_OK(map(*other_domain, 0x40000, kHostB, kPageSize, kReadWrite));
  std::vector<std::unique_ptr<TranslationCache>> caches;
  for (int i = 0; i < 5; ++i) caches.push_back(make_cache(domain));
  auto other = make_cache(other_domain);
  // Unregistered from the head, the middle and the tail of the registry.
  caches.erase(caches.begin() + 4);
  caches.erase(caches.begin() + 2);
  caches.erase(caches.begin());
  caches.push_back(make_cache(domain));
  for (auto& cache : caches) {
    for (int i = 0; i < 2; ++i) {  // fills, then hits
      ASSERT_OK(cache->translate(0x40010, kProtWrite));
      ASSERT_OK(cache->translate(0x41010, kProtRead));
    }
  }
  ASSERT_OK(other->translate(0x40010, kProtRead));
  EXPECT_EQ(domain::page_table_of(*domain).unmap(0x40000, kPageSize), kPageSize);
  for (auto& cache : caches) {
    EXPECT_ERRNO(cache->translate(0x40010, kProtWrite), EFAULT);
    auto kept = cache->translate(0x41010, kProtRead);  // walked again, same answer
    ASSERT_OK(kept);
    EXPECT_EQ(kept->address, kHostA + kPageSize + 0x10);
  }
  auto t = other->translate(0x40010, kProtRead);
  ASSERT_OK(t);
  EXPECT_EQ(t->address, kHostB + 0x10);
  EXPECT_EQ(domain->take_faults().size(), caches.size());
  EXPECT_TRUE(other_domain->take_faults().empty());
}

// Live update replaces a leaf in place (unmap keeping the tables, then map):
// the new address and the new permission are seen at once.
TEST(Iotlb, ReplacedLeafGivesTheNewTranslation) {
  auto domain = make_domain();
  auto cache = make_cache(domain);
  domain::PageTable& table = domain::page_table_of(*domain);
  ASSERT_OK(map(*domain, 0x40000, kHostA, kPageSize, kProtRead));
  ASSERT_OK(cache->translate(0x40000, kProtRead));
  EXPECT_ERRNO(cache->translate(0x40000, kProtWrite), EPERM);  // checked on a hit too
  EXPECT_EQ(table.unmap_keeping_tables(0x40000, kPageSize), kPageSize);
  ASSERT_OK(map(*domain, 0x40000, kHostB, kPageSize, kReadWrite));
  auto t = cache->translate(0x40008, kProtWrite);
  ASSERT_OK(t);
  EXPECT_EQ(t->address, kHostB + 8);
  EXPECT_EQ(t->prot, kReadWrite);
  const auto faults = domain->take_faults();
  ASSERT_EQ(faults.size(), 1U);
  EXPECT_EQ(faults[0].reason, FaultReason::permission);
}

// Lookups that keep evicting entries which never hit stop the filling; a
// hot set brings it back. Every answer along the way is the walk's, and an
// unmap while the cache samples is seen at once.
TEST(Iotlb, StopsFillingOnRandomMissesAndResumesOnAHotSet) {
  constexpr uint64_t kPages = 8 * TranslationCache::kSets * TranslationCache::kWays;
  constexpr uint64_t kBase = 0x10000000;
  DomainConfig config;
  config.page_sizes = kPageSize;  // a 4 KiB leaf per page
  auto domain = make_domain(config);
  auto cache = make_cache(domain);
  ASSERT_OK(map(*domain, kBase, kHostA, kPages * kPageSize, kReadWrite));
  auto check = [&](uint64_t page) {
    auto t = cache->translate(kBase + page * kPageSize + 1, kProtRead);
    ASSERT_OK(t);
    EXPECT_EQ(t->address, kHostA + page * kPageSize + 1);
  };
  // Every page once, twice over: once the sets are full, each fill evicts
  // an entry that never hit.
  for (uint64_t page = 0; page < kPages && cache->caching(); ++page) check(page);
  for (uint64_t page = 0; page < kPages && cache->caching(); ++page) check(page);
  EXPECT_FALSE(cache->caching());
  for (uint64_t i = 0; i < 64 * TranslationCache::kSampleInterval; ++i) check(i % 8);
  EXPECT_TRUE(cache->caching());
  // Into sampling again, then unmap: no sample or hit may return the page.
  for (uint64_t page = 0; page < kPages && cache->caching(); ++page) check(page);
  for (uint64_t page = 0; page < kPages && cache->caching(); ++page) check(page);
  ASSERT_FALSE(cache->caching());
  EXPECT_EQ(domain::page_table_of(*domain).unmap(kBase, kPageSize), kPageSize);
  for (uint64_t i = 0; i < 4 * TranslationCache::kSampleInterval; ++i) {
    EXPECT_ERRNO(cache->translate(kBase + 8, kProtRead), EFAULT);
  }
  EXPECT_EQ(domain->take_faults().size(), 4 * TranslationCache::kSampleInterval);
}

// Through the public API: Ioas::unmap, then a new mapping at the same IOVA.
TEST(Iotlb, IoasUnmapAndRemap) {
  auto ioas = Ioas::create();
  ASSERT_OK(ioas);
  auto domain = make_domain();
  auto cache = make_cache(domain);
  ASSERT_OK((*ioas)->attach(domain));
  auto first = MemorySource::simulated(4 * kPageSize);
  auto second = MemorySource::simulated(4 * kPageSize);
  ASSERT_OK(first);
  ASSERT_OK(second);
  constexpr uint64_t iova = 0x100000;
  ASSERT_OK((*ioas)->map(*first, kReadWrite, iova));
  auto before = cache->translate(iova + kPageSize, kProtRead);
  ASSERT_OK(before);
  ASSERT_OK(cache->translate(iova + kPageSize, kProtRead));
  ASSERT_OK((*ioas)->unmap(iova, 4 * kPageSize));
  EXPECT_ERRNO(cache->translate(iova + kPageSize, kProtRead), EFAULT);
  ASSERT_OK((*ioas)->map(*second, kProtRead, iova));
  auto after = cache->translate(iova + kPageSize, kProtRead);
  ASSERT_OK(after);
  EXPECT_NE(after->address, before->address);
  EXPECT_EQ(after->prot, kProtRead);
  EXPECT_ERRNO(cache->translate(iova + kPageSize, kProtWrite), EPERM);
  ASSERT_OK((*ioas)->unmap_all());
  ASSERT_OK((*ioas)->detach(domain));
  (void)domain->take_faults();
}

// UnmapRounds (translation_test_support.hpp), one lookup per step.
TEST(IotlbStress, UnmapWhileReadersHit) {
  UnmapRounds rounds;
  rounds.run(
      [](TranslationCache& cache, const std::function<uint64_t()>& next_page,
         UnmapRounds::Lookup& lookup) {
        const uint64_t page = next_page();
        lookup.begin();
        auto t = cache.translate(UnmapRounds::kBase + page * kPageSize + 8, kProtRead);
        lookup.end();
        if (!t.ok()) return lookup.failed(t.code());
        lookup.translated(page, t->address);
      },
      /*steps_per_unmap=*/200);
}

}  // namespace
}  // namespace iomm
