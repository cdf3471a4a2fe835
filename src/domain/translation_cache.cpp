#include "iomm/translation_cache.hpp"

#include <atomic>
#include <bit>
#include <cerrno>
#include <new>
#include <utility>

#include "domain/iotlb.hpp"
#include "domain/page_table.hpp"
#include "domain/soft_domain_impl.hpp"
#include "mem/host_access.hpp"

namespace iomm {

Result<std::unique_ptr<TranslationCache>> TranslationCache::create(
    std::shared_ptr<SoftDomain> domain) {
  if (domain == nullptr) return Error(EINVAL, "a translation cache needs a domain");
  std::unique_ptr<TranslationCache> cache(new (std::nothrow) TranslationCache(std::move(domain)));
  if (cache == nullptr) return Error(ENOMEM, "cannot allocate the translation cache");
  // Last, and it cannot fail: from here on every unmap empties the cache.
  domain::page_table_of(*cache->domain_).iotlb().add(*cache);
  return cache;
}

TranslationCache::TranslationCache(std::shared_ptr<SoftDomain> domain) noexcept
    : domain_(std::move(domain)) {}

TranslationCache::~TranslationCache() { domain::page_table_of(*domain_).iotlb().remove(*this); }

void TranslationCache::clear() noexcept {
  const auto clear_way = [](std::atomic<uint64_t>* way) {
    for (unsigned set = 0; set < kSets; ++set) {
      // Only what is set: a line with nothing cached is not written, so an
      // unmap does not take it from its owner's cache.
      if (way[set].load(std::memory_order_relaxed) != 0) {
        way[set].store(0, std::memory_order_relaxed);
      }
    }
  };
  clear_way(tags_[0]);
  // Way 0 emptied before way 1 is read: fill() moves an entry from way 0 to
  // way 1 and then checks way 0 (see fill()).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  clear_way(tags_[1]);
}

void TranslationCache::invalidate() noexcept {
  // The ordering argument is in domain/iotlb.hpp.
  epoch_.fetch_add(1, std::memory_order_seq_cst);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  clear();
}

void TranslationCache::settle(uint64_t epoch) noexcept {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (epoch_.load(std::memory_order_relaxed) != epoch) clear();
}

void TranslationCache::note_miss(unsigned set, uint64_t iova) noexcept {
  const uint64_t want = want_of(iova);
  const auto holds_page = [want](uint64_t tag) {
    return (tag & kProtBits) != 0 && ((tag ^ want) & kAddressMask) == 0;
  };
  const uint64_t way1 = tags_[1][set].load(std::memory_order_relaxed);
  if (holds_page(tags_[0][set].load(std::memory_order_relaxed)) || holds_page(way1)) return;
  if (way1 != 0 && ++misses_ == kMissesToStop) {
    // Each of these fills dropped an entry, and nothing hit since: filling
    // only costs.
    sampling_ = true;
    since_sample_ = 0;
    useful_samples_ = 0;
    misses_ = 1;
  }
}

void TranslationCache::sample(uint64_t iova) noexcept {
  since_sample_ = 0;
  const uint64_t want = want_of(iova);
  uint64_t& recent = recent_[recent_of(iova)];
  const bool useful = recent == want || misses_ == 0;
  recent = want;
  misses_ = 1;
  useful_samples_ = useful ? useful_samples_ + 1 : 0;
  if (useful_samples_ == kResumeHits) {
    // What is cached was filled before the stop, by the lookups that made
    // it stop, and would keep the pages the cache now fills out of way 0.
    clear();
    sampling_ = false;
    misses_ = 0;
  }
}

void TranslationCache::fill(unsigned set, uint64_t iova, const domain::Leaf& leaf) noexcept {
  const DomainConfig& config = domain_->config();
  const uint64_t first = iova & kAddressMask;
  if (first < config.aperture_start || first + (kPageSize - 1) > config.aperture_last) return;
  const uint64_t newest = tags_[0][set].load(std::memory_order_relaxed);
  if (newest != 0 && ((newest ^ first) & kAddressMask) != 0) {
    deltas_[1][set] = deltas_[0][set];
    tags_[1][set].store(newest, std::memory_order_relaxed);
    // An unmap emptying the cache now may have read way 1 before this copy
    // and emptied way 0 after newest was read: the copy would bring back
    // what it removed, and the epoch cannot tell when the unmap's increment
    // came before the walk. Either the unmap's fence between the ways comes
    // first in the total order of seq_cst fences, and this load sees way 0
    // emptied, or this fence does, and the unmap's read of way 1 sees the
    // copy and empties it.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (tags_[0][set].load(std::memory_order_relaxed) != newest) {
      tags_[1][set].store(0, std::memory_order_relaxed);
    }
  }
  deltas_[0][set] = leaf.address - iova;
  tags_[0][set].store(first | (leaf.prot & kProtBits) |
                          (leaf.host_access != mem::HostAccess::none ? kHasHost : 0) |
                          (static_cast<uint64_t>(std::countr_zero(leaf.size)) << kSizeShift),
                      std::memory_order_relaxed);
}

Result<Translation> TranslationCache::translate_missed(uint64_t iova, uint32_t access) {
  if (sampling_) {
    sample(iova);
    return domain_->translate(iova, access);
  }
  const unsigned set = set_of(iova);
  note_miss(set, iova);
  // Before the walk: see settle().
  const uint64_t epoch = epoch_.load(std::memory_order_seq_cst);
  domain::Leaf leaf;
  Result<Translation> translation = domain::translate_leaf(*domain_, iova, access, &leaf);
  if (translation.ok()) {
    fill(set, iova, leaf);
    settle(epoch);
  }
  return translation;
}

BatchResult TranslationCache::translate_many(std::span<const uint64_t> iovas, uint32_t access,
                                             std::span<uint64_t> addresses) {
  if (Status checked = domain::check_batch(iovas, access, addresses); !checked.ok()) {
    return {.status = std::move(checked)};
  }
  const size_t n = iovas.size();
  const uint64_t mask = tag_mask(access);
  size_t i = 0;
  while (i < n) {
    if (sampling_) return translate_sampling(iovas, i, access, addresses);
    const size_t hits_from = i;
    for (; i < n; ++i) {
      const uint64_t iova = iovas[i];
      const unsigned set = set_of(iova);
      const uint64_t want = want_of(iova);
      // Way 0 first, as translate(): it holds nearly every hit.
      if (((tags_[0][set].load(std::memory_order_relaxed) ^ want) & mask) == 0) [[likely]] {
        addresses[i] = iova + deltas_[0][set];
      } else if (((tags_[1][set].load(std::memory_order_relaxed) ^ want) & mask) == 0) {
        addresses[i] = iova + deltas_[1][set];
      } else {
        break;
      }
    }
    if (i != hits_from) misses_ = 0;
    if (i == n) break;
    Result<Translation> translation = translate_missed(iovas[i], access);
    if (!translation.ok()) return {.translated = i, .status = std::move(translation).error()};
    addresses[i] = translation->address;
    ++i;
  }
  return {.translated = n};
}

BatchResult TranslationCache::translate_sampling(std::span<const uint64_t> iovas, size_t i,
                                                 uint32_t access, std::span<uint64_t> addresses) {
  const std::span<const uint64_t> rest = iovas.subspan(i);
  // The domain's own batch, so that the walk is exactly the one without a
  // cache; the samples are looked at afterwards, and only need their IOVAs.
  BatchResult result = domain_->translate_many(rest, access, addresses.subspan(i));
  // The samples are the IOVAs at which since_sample_ would have reached
  // kSampleInterval if counted one by one over those the walk visited (those
  // it translated and the one that failed, if any).
  const size_t visited = result.ok() ? result.translated : result.translated + 1;
  const unsigned before = since_sample_;
  for (size_t j = kSampleInterval - 1 - before; j < visited; j += kSampleInterval) {
    sample(rest[j]);
    if (!sampling_) break;
  }
  if (sampling_) {
    since_sample_ = static_cast<unsigned>((before + visited) & (kSampleInterval - 1));
  }
  result.translated += i;
  return result;
}

}  // namespace iomm
