// The invalidation side of the software domains' IOTLB
// (iomm::TranslationCache, include/iomm/translation_cache.hpp): the domain's
// generation, which every cached translation records and must match.
//
// Every domain's generation is drawn from one process-wide counter, so no two
// domains ever share one and a slot filled for another (or a destroyed)
// domain never matches. The page table calls invalidate() after every change
// that clears or replaces a leaf (unmap, the undo of a failed map, live
// update) and before its caller waits for readers. A cache reads the
// generation *before* its walk and fills with that value, so a walk that
// raced with an unmap fills a slot that is already stale and never hits.
// Ordering: leaves are cleared with release stores, then the generation is
// replaced (seq_cst); a lookup loads the generation (seq_cst) before it
// probes or walks, so a lookup that begins after an unmap completed sees the
// new generation, misses every older slot, and its walk sees the cleared
// leaves. Maps need no invalidation: they only fill empty entries of the
// table, and a cache holds only present translations.
#pragma once

#include <atomic>
#include <cstdint>

namespace iomm::domain {

class Iotlb {
 public:
  Iotlb() noexcept;
  Iotlb(const Iotlb&) = delete;
  Iotlb& operator=(const Iotlb&) = delete;

  // Drop every cached translation of this domain (a new generation).
  void invalidate() noexcept;

  // What caches load (seq_cst) before they probe or walk.
  [[nodiscard]] const std::atomic<uint64_t>& generation() const noexcept { return generation_; }

 private:
  std::atomic<uint64_t> generation_;
};

}  // namespace iomm::domain
