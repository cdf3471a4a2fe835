#include "domain/iotlb.hpp"

#include "iomm/translation_cache.hpp"

namespace iomm::domain {

void Iotlb::invalidate() noexcept {
  const std::lock_guard lock(mu_);
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
