// Batch translation (SoftDomain::translate_many and
// TranslationCache::translate_many): every address is what translate()
// gives; the batch stops at the first IOVA that fails, with translate()'s
// exact error and fault for it and none for the IOVAs after it; an unmap is
// seen by the next batch, whether the cache hits, fills or samples.
#include <gtest/gtest.h>

#include <cerrno>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "domain/page_table.hpp"
#include "domain/soft_domain_impl.hpp"
#include "iomm/domain.hpp"
#include "iomm/rcu.hpp"
#include "iomm/translation_cache.hpp"
#include "test_support.hpp"
#include "translation_test_support.hpp"

namespace iomm {
namespace {

// The two ways to translate a batch, so that every test runs on both.
enum class Through { domain, cache };

class TranslateMany : public testing::TestWithParam<Through> {
 protected:
  void make(const DomainConfig& config = {}) {
    domain_ = make_domain(config);
    cache_ = make_cache(domain_);
  }
  BatchResult translate_many(std::span<const uint64_t> iovas, uint32_t access,
                             std::span<uint64_t> addresses) {
    return GetParam() == Through::cache ? cache_->translate_many(iovas, access, addresses)
                                        : domain_->translate_many(iovas, access, addresses);
  }
  // translate_many of iovas, checked against translate() of each.
  void expect_as_translate(const std::vector<uint64_t>& iovas, uint32_t access) {
    std::vector<uint64_t> addresses(iovas.size(), ~uint64_t{0});
    const BatchResult r = translate_many(iovas, access, addresses);
    ASSERT_OK(r.status);
    EXPECT_EQ(r.translated, iovas.size());
    for (size_t i = 0; i < iovas.size(); ++i) {
      auto t = domain_->translate(iovas[i], access);
      ASSERT_OK(t);
      EXPECT_EQ(addresses[i], t->address) << "iova 0x" << std::hex << iovas[i];
    }
  }

  std::shared_ptr<SoftDomain> domain_;
  std::unique_ptr<TranslationCache> cache_;
};

INSTANTIATE_TEST_SUITE_P(Through, TranslateMany, testing::Values(Through::domain, Through::cache),
                         [](const testing::TestParamInfo<Through>& param) {
                           return param.param == Through::cache ? "Cache" : "Domain";
                         });

// Batches shorter and longer than the walk's lookahead, over 4 KiB, 2 MiB
// and 1 GiB leaves and simulated memory, twice (the cache then hits).
TEST_P(TranslateMany, GivesWhatTranslateGives) {
  make();
  ASSERT_OK(map(*domain_, 0x10000, kHostA, 64 * kPageSize, kReadWrite));
  ASSERT_OK(map(*domain_, kPageSize2M, kHostB, kPageSize2M, kProtRead));
  ASSERT_OK(map(*domain_, kPageSize1G, 0x40000000000, kPageSize1G, kReadWrite));
  ASSERT_OK(
      map(*domain_, 0x80000, kHostA + kPageSize1G, kPageSize, kProtRead, mem::HostAccess::none));
  std::vector<uint64_t> iovas;
  for (uint64_t i = 0; i < 100; ++i) {
    switch (i % 4) {
      case 0:
        iovas.push_back(0x10000 + (i * 7 % 64) * kPageSize + i);
        break;
      case 1:
        iovas.push_back(kPageSize2M + i * 0x3333);
        break;
      case 2:
        iovas.push_back(kPageSize1G + i * 0x123457);
        break;
      default:
        iovas.push_back(0x80000 + i);
    }
  }
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t n : {size_t{1}, size_t{5}, domain::PageTable::kLookahead + 1, iovas.size()}) {
      expect_as_translate(std::vector<uint64_t>(iovas.begin(), iovas.begin() + n), kProtRead);
    }
  }
  std::vector<uint64_t> none;
  const BatchResult empty = translate_many({}, kProtRead, none);
  ASSERT_OK(empty.status);
  EXPECT_EQ(empty.translated, 0U);
  EXPECT_TRUE(domain_->take_faults().empty());
}

// The batch walk resumes below the upper levels while the IOVAs stay under
// one level-2 table (512 GiB): batches that alternate between two such
// regions, reach into a region with nothing mapped, or into one whose
// tables an unmap retired, still give exactly what translate() gives.
TEST_P(TranslateMany, BatchesAcrossUpperTablesGiveWhatTranslateGives) {
  make();
  constexpr uint64_t kRegion = uint64_t{1} << 39;
  const uint64_t a = 0x10000;
  const uint64_t b = 2 * kRegion + a;  // same offsets under its tables as a
  ASSERT_OK(map(*domain_, a, kHostA, 4 * kPageSize, kReadWrite));
  ASSERT_OK(map(*domain_, b, kHostB, 4 * kPageSize, kReadWrite));
  std::vector<uint64_t> iovas;
  for (uint64_t i = 0; i < 40; ++i) iovas.push_back((i % 2 == 0 ? a : b) + (i % 4) * kPageSize + i);
  for (int pass = 0; pass < 2; ++pass) expect_as_translate(iovas, kProtRead);

  std::vector<uint64_t> addresses(iovas.size(), 0);
  std::vector<uint64_t> reaching = iovas;
  reaching[5] = kRegion + 0x10000;  // no table under this region
  BatchResult r = translate_many(reaching, kProtRead, addresses);
  EXPECT_ERRNO(r.status, EFAULT);
  EXPECT_EQ(r.translated, 5U);
  auto faults = domain_->take_faults();
  ASSERT_EQ(faults.size(), 1U);
  EXPECT_EQ(faults[0].iova, reaching[5]);
  EXPECT_EQ(faults[0].reason, FaultReason::not_present);

  // Emptying region b retires its tables, the level-2 one included.
  domain::PageTable& table = domain::page_table_of(*domain_);
  const uint64_t tables_before = table.counters().table_pages;
  EXPECT_EQ(table.unmap(b, 4 * kPageSize), 4 * kPageSize);
  table.free_retired(domain::PageTable::retire_horizon());  // no reader is left
  EXPECT_EQ(table.counters().table_pages, tables_before - 3);
  r = translate_many(iovas, kProtRead, addresses);
  EXPECT_ERRNO(r.status, EFAULT);
  EXPECT_EQ(r.translated, 1U);
  faults = domain_->take_faults();
  ASSERT_EQ(faults.size(), 1U);
  EXPECT_EQ(faults[0].iova, iovas[1]);

  ASSERT_OK(map(*domain_, b, kHostA + kPageSize1G, 4 * kPageSize, kReadWrite));
  for (int pass = 0; pass < 2; ++pass) expect_as_translate(iovas, kProtRead);
  EXPECT_TRUE(domain_->take_faults().empty());
}

TEST_P(TranslateMany, BadArgumentsAreEinvalAndTranslateNothing) {
  make();
  ASSERT_OK(map(*domain_, 0x10000, kHostA, kPageSize, kReadWrite));
  const std::vector<uint64_t> iovas = {0x10000, 0x10008};
  std::vector<uint64_t> addresses(2, 0);
  for (uint32_t access : {0U, 4U, kProtRead | 4U, 0x80000001U}) {
    const BatchResult r = translate_many(iovas, access, addresses);
    EXPECT_ERRNO(r.status, EINVAL);
    EXPECT_EQ(r.translated, 0U);
  }
  std::vector<uint64_t> short_addresses(1, 0);
  const BatchResult r = translate_many(iovas, kProtRead, short_addresses);
  EXPECT_ERRNO(r.status, EINVAL);
  EXPECT_EQ(r.translated, 0U);
  EXPECT_EQ(addresses, std::vector<uint64_t>(2, 0));
  EXPECT_TRUE(domain_->take_faults().empty());
}

// The first failing IOVA ends the batch with its own errno and fault; the
// IOVAs before it are translated, those after it are not looked up.
TEST_P(TranslateMany, StopsAtTheFirstFailureWithItsErrno) {
  DomainConfig config;
  config.aperture_last = (uint64_t{1} << 40) - 1;
  make(config);
  ASSERT_OK(map(*domain_, 0x100000, kHostA, 32 * kPageSize, kProtRead));
  struct Case {
    uint64_t bad;
    uint32_t access;
    int code;
    FaultReason reason;
  };
  const Case cases[] = {
      {0x100000 + 40 * kPageSize, kProtRead, EFAULT, FaultReason::not_present},
      {0x100000 + 3 * kPageSize, kProtWrite, EPERM, FaultReason::permission},
      {uint64_t{1} << 40, kProtRead, EFAULT, FaultReason::outside_aperture},
  };
  for (const Case& c : cases) {
    for (size_t at : {size_t{0}, size_t{7}, size_t{20}}) {
      std::vector<uint64_t> iovas;
      for (size_t i = 0; i < 30; ++i) iovas.push_back(0x100000 + (i % 32) * kPageSize + 1);
      iovas[at] = c.bad;
      // Read-only pages: a write batch fails at its first IOVA, whatever it is.
      const size_t fails_at = c.access == kProtWrite ? 0 : at;
      std::vector<uint64_t> addresses(iovas.size(), 0);
      for (int pass = 0; pass < 2; ++pass) {  // the cache fills, then hits
        const BatchResult r = translate_many(iovas, c.access, addresses);
        EXPECT_ERRNO(r.status, c.code);
        EXPECT_EQ(r.translated, fails_at);
        for (size_t i = 0; i < fails_at; ++i) {
          EXPECT_EQ(addresses[i], kHostA + (i % 32) * kPageSize + 1);
        }
        const auto faults = domain_->take_faults();
        ASSERT_EQ(faults.size(), 1U);
        EXPECT_EQ(faults[0].iova, iovas[fails_at]);
        EXPECT_EQ(faults[0].reason, c.code == EPERM ? FaultReason::permission : c.reason);
        EXPECT_EQ(faults[0].requested, c.access);
      }
    }
  }
}

// An unmap between two batches is seen by the second, at the IOVA it
// removed; a leaf replaced with another permission too.
TEST_P(TranslateMany, UnmapAndReplaceAreSeenByTheNextBatch) {
  make();
  domain::PageTable& table = domain::page_table_of(*domain_);
  ASSERT_OK(map(*domain_, 0x40000, kHostA, 8 * kPageSize, kReadWrite));
  std::vector<uint64_t> iovas;
  for (uint64_t i = 0; i < 8; ++i) iovas.push_back(0x40000 + i * kPageSize + 8);
  std::vector<uint64_t> addresses(iovas.size());
  for (int pass = 0; pass < 2; ++pass)
    ASSERT_OK(translate_many(iovas, kProtWrite, addresses).status);
  EXPECT_EQ(table.unmap_keeping_tables(0x40000 + 5 * kPageSize, kPageSize), kPageSize);
  BatchResult r = translate_many(iovas, kProtWrite, addresses);
  EXPECT_ERRNO(r.status, EFAULT);
  EXPECT_EQ(r.translated, 5U);
  ASSERT_OK(map(*domain_, 0x40000 + 5 * kPageSize, kHostB, kPageSize, kProtRead));
  r = translate_many(iovas, kProtWrite, addresses);
  EXPECT_ERRNO(r.status, EPERM);
  EXPECT_EQ(r.translated, 5U);
  r = translate_many(iovas, kProtRead, addresses);
  ASSERT_OK(r.status);
  EXPECT_EQ(addresses[5], kHostB + 8);
  EXPECT_EQ(addresses[4], kHostA + 4 * kPageSize + 8);
  const auto faults = domain_->take_faults();
  ASSERT_EQ(faults.size(), 2U);
  EXPECT_EQ(faults[0].reason, FaultReason::not_present);
  EXPECT_EQ(faults[1].reason, FaultReason::permission);
}

// Random batches over far more pages than the cache holds make it stop
// filling (it then walks with the domain's batch walk and samples); the
// answers stay the walk's, an unmap is seen at once, and a hot set brings
// the filling back.
TEST(TranslateManyCache, SamplesOnRandomBatchesAndStaysExact) {
  // Far more pages than the cache holds: a hit (one lookup in 64) seldom
  // breaks a run of kMissesToStop misses.
  constexpr uint64_t kPages = 64 * TranslationCache::kSets * TranslationCache::kWays;
  constexpr uint64_t kBase = 0x10000000;
  DomainConfig config;
  config.page_sizes = kPageSize;
  auto domain = make_domain(config);
  auto cache = make_cache(domain);
  ASSERT_OK(map(*domain, kBase, kHostA, kPages * kPageSize, kReadWrite));
  std::vector<uint64_t> iovas(64);
  std::vector<uint64_t> addresses(iovas.size());
  uint64_t x = 0x9e3779b97f4a7c15ULL;
  auto random_batch = [&] {
    for (auto& iova : iovas) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      iova = kBase + (x % kPages) * kPageSize + (x >> 52);
    }
    const BatchResult r = cache->translate_many(iovas, kProtRead, addresses);
    ASSERT_OK(r.status);
    for (size_t i = 0; i < iovas.size(); ++i) {
      ASSERT_EQ(addresses[i], kHostA + (iovas[i] - kBase));
    }
  };
  for (int i = 0; i < 200 && cache->caching(); ++i) random_batch();
  ASSERT_FALSE(cache->caching());
  for (int i = 0; i < 20; ++i) random_batch();
  EXPECT_FALSE(cache->caching());
  // Unmapped while sampling: no batch may translate the page.
  EXPECT_EQ(domain::page_table_of(*domain).unmap(kBase, kPageSize), kPageSize);
  std::vector<uint64_t> first(64, kBase + 16);
  for (int i = 0; i < 4 * static_cast<int>(TranslationCache::kSampleInterval); ++i) {
    const BatchResult r = cache->translate_many(first, kProtRead, addresses);
    EXPECT_ERRNO(r.status, EFAULT);
    EXPECT_EQ(r.translated, 0U);
  }
  EXPECT_EQ(domain->take_faults().size(), 4 * TranslationCache::kSampleInterval);
  // A hot set of 8 pages: the samples hit and the cache fills again.
  for (int i = 0; i < 64; ++i) {
    for (size_t j = 0; j < iovas.size(); ++j) iovas[j] = kBase + (1 + j % 8) * kPageSize + j;
    ASSERT_OK(cache->translate_many(iovas, kProtRead, addresses).status);
    for (size_t j = 0; j < iovas.size(); ++j) {
      ASSERT_EQ(addresses[j], kHostA + (iovas[j] - kBase));
    }
  }
  EXPECT_TRUE(cache->caching());
}

// UnmapRounds (translation_test_support.hpp), a batch of 8 per step: in a
// batch that began after page i's unmap returned, page i must fail with
// EFAULT, and every address must be the current round's.
TEST(TranslateManyStress, UnmapWhileBatchesHit) {
  constexpr size_t kBatch = 8;
  UnmapRounds rounds;
  rounds.run(
      [](TranslationCache& cache, const std::function<uint64_t()>& next_page,
         UnmapRounds::Lookup& lookup) {
        uint64_t pages[kBatch];
        uint64_t iovas[kBatch];
        uint64_t addresses[kBatch];
        for (size_t i = 0; i < kBatch; ++i) {
          pages[i] = next_page();
          iovas[i] = UnmapRounds::kBase + pages[i] * kPageSize + 8;
        }
        lookup.begin();
        const BatchResult result = cache.translate_many(iovas, kProtRead, addresses);
        lookup.end();
        if (!result.ok()) lookup.failed(result.status.code());
        for (size_t i = 0; i < result.translated; ++i) lookup.translated(pages[i], addresses[i]);
      },
      /*steps_per_unmap=*/50);
}

}  // namespace
}  // namespace iomm
