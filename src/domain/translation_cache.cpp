#include "iomm/translation_cache.hpp"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <iterator>
#include <new>
#include <utility>

#include "domain/page_table.hpp"
#include "domain/soft_domain_impl.hpp"
#include "iomm/rcu.hpp"
#include "mem/host_access.hpp"
#include "sync/rcu.hpp"

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

void TranslationCache::refresh_generation() noexcept {
  // Read before the walks that may fill: if an unmap races with one, the
  // generation its fill is recorded under is stale already
  // (domain/iotlb.hpp).
  const uint64_t generation = generation_->load(std::memory_order_seq_cst);
  if (generation != valid_generation_) {
    // Something was unmapped since the entries were filled.
    std::fill(std::begin(sets_), std::end(sets_), Set{});
    valid_generation_ = generation;
    if (!sampling_) armed_generation_ = generation;
  }
}

void TranslationCache::note_probe(const Set& set, uint64_t iova) noexcept {
  const uint64_t page = tag_of(iova);
  const uint64_t mask = tag_mask(0);
  const bool present =
      ((set.way[0].tag ^ page) & mask) == 0 || ((set.way[1].tag ^ page) & mask) == 0;
  if (sampling_) {
    since_sample_ = 0;
    sampled_hits_ = present ? sampled_hits_ + 1 : 0;
    if (sampled_hits_ == kResumeHits) {
      sampling_ = false;
      evicting_misses_ = 0;
      armed_generation_ = valid_generation_;
    }
  } else if (!present && set.way[1].tag != 0 && ++evicting_misses_ == kMissesToStop) {
    // Each of these fills dropped an entry, and nothing hit since: filling
    // only costs.
    sampling_ = true;
    since_sample_ = 0;
    sampled_hits_ = 0;
    armed_generation_ = 0;
  }
}

void TranslationCache::fill(Set& set, uint64_t iova, const domain::Leaf& leaf) noexcept {
  const DomainConfig& config = domain_->config();
  const uint64_t first = iova & kAddressMask;
  if (first < config.aperture_start || first + (kPageSize - 1) > config.aperture_last) return;
  const uint64_t tag = tag_of(iova);
  if (((set.way[0].tag ^ tag) & tag_mask(0)) != 0) set.way[1] = set.way[0];
  set.way[0] = Entry{
      .tag = tag | tag_prot(leaf.prot) |
             (leaf.host_access != mem::HostAccess::none ? kHasHost : 0) |
             (static_cast<uint64_t>(std::countr_zero(leaf.size)) << kSizeShift),
      .page = leaf.address & kAddressMask,
  };
}

Result<Translation> TranslationCache::translate_missed(uint64_t iova, uint32_t access) {
  refresh_generation();
  Set& set = sets_[set_of(iova)];
  note_probe(set, iova);
  domain::Leaf leaf;
  Result<Translation> translation = domain::translate_leaf(*domain_, iova, access, &leaf);
  if (translation.ok()) fill(set, iova, leaf);
  return translation;
}

BatchResult TranslationCache::translate_many(std::span<const uint64_t> iovas, uint32_t access,
                                             std::span<uint64_t> addresses) {
  if (Status checked = domain::check_batch(iovas, access, addresses); !checked.ok()) {
    return {.status = std::move(checked)};
  }
  // The one generation load of the batch: while it is the entries' own, a
  // hit needs no other check.
  refresh_generation();
  const size_t n = iovas.size();
  const uint64_t mask = tag_mask(access);
  const uint64_t prot = tag_prot(access);
  size_t i = 0;
  while (i < n) {
    if (sampling_) return translate_sampling(iovas, i, access, addresses.data());
    const size_t hits_from = i;
    for (; i < n; ++i) {
      const uint64_t iova = iovas[i];
      const Entry* set = sets_[set_of(iova)].way;
      const uint64_t want = tag_of(iova) | prot;
      // Both ways at once, no load waiting for another.
      const bool in_0 = ((set[0].tag ^ want) & mask) == 0;
      const bool in_1 = ((set[1].tag ^ want) & mask) == 0;
      if (!(in_0 | in_1)) break;
      addresses[i] = (in_0 ? set[0].page : set[1].page) | (iova & (kPageSize - 1));
    }
    if (i != hits_from) evicting_misses_ = 0;
    if (i == n) break;
    // It reads the generation again before its walk, so its fill is valid
    // under the generation the entries are then valid under.
    Result<Translation> translation = translate_missed(iovas[i], access);
    if (!translation.ok()) return {.translated = i, .status = std::move(translation).error()};
    addresses[i] = translation->address;
    ++i;
  }
  return {.translated = n};
}

BatchResult TranslationCache::translate_sampling(std::span<const uint64_t> iovas, size_t i,
                                                 uint32_t access, uint64_t* addresses) {
  const std::span<const uint64_t> rest = iovas.subspan(i);
  static_assert(std::has_single_bit(kSampleInterval));
  // The samples are the IOVAs at which since_sample_ would reach
  // kSampleInterval if counted one by one: decided on the index, so the walk
  // loop keeps no count in memory. A sample that resumes caching leaves the
  // rest of the batch to the walk.
  const size_t phase = since_sample_ + 1;
  // Every walk here began after the last generation load, so its samples
  // may fill.
  const auto sample = [this, rest, phase](size_t j, uint64_t entry, unsigned level) {
    if (((j + phase) & (kSampleInterval - 1)) != 0) [[likely]]
      return;
    const uint64_t iova = rest[j];
    Set& set = sets_[set_of(iova)];
    note_probe(set, iova);
    fill(set, iova, domain::PageTable::leaf_of(entry, level, iova));
  };
  const auto batch = [&] {
    return domain::translate_batch(*domain_, rest, access, addresses + i, sample);
  };
  BatchResult result;
  if (sync::in_read_section()) {
    result = batch();
  } else {
    const RcuReadGuard guard;
    result = batch();
  }
  // The count as if kept one by one over the IOVAs the walk visited (those
  // it translated and the one that failed, if any).
  const size_t visited = result.ok() ? result.translated : result.translated + 1;
  since_sample_ = static_cast<unsigned>((since_sample_ + visited) & (kSampleInterval - 1));
  result.translated += i;
  return result;
}

}  // namespace iomm
