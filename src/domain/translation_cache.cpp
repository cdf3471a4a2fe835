#include "iomm/translation_cache.hpp"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <iterator>
#include <new>
#include <utility>

#include "domain/page_table.hpp"
#include "domain/soft_domain_impl.hpp"
#include "mem/host_access.hpp"

namespace iomm {

Result<std::unique_ptr<TranslationCache>> TranslationCache::create(
    std::shared_ptr<SoftDomain> domain) {
  if (domain == nullptr) return Error(EINVAL, "a translation cache needs a domain");
  const std::atomic<uint64_t>* generation = &domain::page_table_of(*domain).iotlb().generation();
  std::unique_ptr<TranslationCache> cache(new (std::nothrow)
                                              TranslationCache(std::move(domain), generation));
  if (cache == nullptr) return Error(ENOMEM, "cannot allocate the translation cache");
  return cache;
}

TranslationCache::TranslationCache(std::shared_ptr<SoftDomain> domain,
                                   const std::atomic<uint64_t>* generation) noexcept
    : domain_(std::move(domain)), generation_(generation) {}

TranslationCache::~TranslationCache() = default;

Result<Translation> TranslationCache::translate_missed(uint64_t iova, uint32_t access) {
  // Read before the walk: if an unmap races with it, the generation this
  // fill is recorded under is stale already (domain/iotlb.hpp).
  const uint64_t generation = generation_->load(std::memory_order_seq_cst);
  if (generation != valid_generation_) {
    // Something was unmapped since the entries were filled.
    std::fill(std::begin(sets_), std::end(sets_), Set{});
    valid_generation_ = generation;
    if (!sampling_) armed_generation_ = generation;
  }
  Set& set = sets_[set_of(iova)];
  const uint64_t tag = tag_of(iova);
  const bool present = set.way[0].tag == tag || set.way[1].tag == tag;
  if (sampling_) {
    since_sample_ = 0;
    sampled_hits_ = present ? sampled_hits_ + 1 : 0;
    if (sampled_hits_ == kResumeHits) {
      sampling_ = false;
      wasted_fills_ = 0;
      armed_generation_ = valid_generation_;
    }
  } else if (!present && set.way[1].tag != 0) {
    // The fill drops way 1: an entry that never hit was a fill that only cost.
    if ((set.way[1].word & kUsed) != 0) {
      wasted_fills_ = 0;
    } else if (++wasted_fills_ == kWastedFillsToStop) {
      sampling_ = true;
      since_sample_ = 0;
      sampled_hits_ = 0;
      armed_generation_ = 0;
    }
  }

  domain::Leaf leaf;
  Result<Translation> translation = domain::translate_leaf(*domain_, iova, access, &leaf);
  // Only pages wholly inside the aperture are cached, so a hit needs no
  // aperture check.
  const DomainConfig& config = domain_->config();
  const uint64_t first = iova & kAddressMask;
  if (translation.ok() && first >= config.aperture_start &&
      first + (kPageSize - 1) <= config.aperture_last) {
    if (set.way[0].tag != tag) set.way[1] = set.way[0];
    set.way[0] = Entry{
        .tag = tag,
        .word = (leaf.address & kAddressMask) | (leaf.prot & kProtMask) |
                (leaf.host_access != mem::HostAccess::none ? kHasHost : 0) |
                (static_cast<uint64_t>(std::countr_zero(leaf.size)) << kSizeShift),
    };
  }
  return translation;
}

}  // namespace iomm
