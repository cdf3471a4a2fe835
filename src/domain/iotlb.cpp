#include "domain/iotlb.hpp"

#include <mutex>
#include <shared_mutex>

#include "iomm/translation_cache.hpp"

namespace iomm::domain {

void Iotlb::invalidate() noexcept {
  // Shared: unmaps of disjoint ranges empty the caches side by side (an
  // empty is atomic stores and an atomic increment); only registration
  // changes the list.
  const std::shared_lock lock(mu_);
  for (TranslationCache* cache = first_; cache != nullptr; cache = cache->next_) {
    cache->invalidate();
  }
}

void Iotlb::add(TranslationCache& cache) const noexcept {
  const std::lock_guard lock(mu_);
  cache.prev_ = nullptr;
  cache.next_ = first_;
  if (first_ != nullptr) first_->prev_ = &cache;
  first_ = &cache;
}

void Iotlb::remove(TranslationCache& cache) const noexcept {
  const std::lock_guard lock(mu_);
  (cache.prev_ != nullptr ? cache.prev_->next_ : first_) = cache.next_;
  if (cache.next_ != nullptr) cache.next_->prev_ = cache.prev_;
  cache.prev_ = nullptr;
  cache.next_ = nullptr;
}

}  // namespace iomm::domain
