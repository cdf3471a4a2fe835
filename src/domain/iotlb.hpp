// The invalidation side of the software domains' IOTLB
// (iomm::TranslationCache, include/iomm/translation_cache.hpp): the registry
// of a domain's caches, each of which every unmap empties before it returns.
//
// The page table calls invalidate() after every change that clears or
// replaces a leaf (unmap, the undo of a failed map, live update), after the
// leaves are cleared and before its caller waits for readers. Maps need no
// invalidation: they only fill empty entries of the table, and a cache
// holds only present translations.
//
// Ordering (U: the unmapping thread, R: a cache's owner). U clears the
// leaves, then for each cache bumps its epoch (a seq_cst read-modify-write),
// issues a seq_cst fence and stores 0 into every tag it finds set, all
// before the unmap returns. A lookup of R that happens after that return
// loads each tag after U's store: it sees 0, or a later store of R's own.
// R stores tags only after a walk: it reads the epoch (seq_cst) before the
// walk, and after its stores issues a seq_cst fence and reads the epoch
// again; if it changed, R empties the cache before the lookup returns.
// Either R's fence precedes U's bump in the single total order of seq_cst
// operations, hence precedes U's fence too, and U's loads of the tags see
// R's stores, which U then clears; or it follows the bump, and R's second
// read sees it. Only R reads the cache, and the lookup that filled began
// before U returned, so no lookup that begins after an unmap returned sees
// a translation it removed. A walk whose first epoch read saw U's bump
// also sees U's cleared leaves: the read synchronises with the bump, which
// is sequenced after the clearing. A fill also moves way 0's entry to way 1,
// a copy of a tag U may be clearing even when the epoch read came after U's
// bump; U fences between clearing way 0 and reading way 1, and R fences
// after the copy and reads way 0 again, dropping the copy if it was
// emptied: one of the two sees the other (TranslationCache::fill).
#pragma once

#include <mutex>

#include "sync/ranked_mutex.hpp"

namespace iomm {
class TranslationCache;
}

namespace iomm::domain {

class Iotlb {
 public:
  Iotlb() = default;
  Iotlb(const Iotlb&) = delete;
  Iotlb& operator=(const Iotlb&) = delete;

  // Empty every registered cache of this domain.
  void invalidate() noexcept;

  // Registration, from TranslationCache::create and its destructor. Const
  // because the page table hands its Iotlb out as const: the registry is
  // not the table's state. Cannot fail (the caches are linked through
  // themselves).
  void add(TranslationCache& cache) const noexcept;
  void remove(TranslationCache& cache) const noexcept;

 private:
  // Shared by invalidate(), exclusive by add() and remove().
  mutable sync::RankedSharedMutex mu_{sync::LockRank::iotlb_caches, "domain::Iotlb::mu_"};
  mutable TranslationCache* first_ = nullptr;  // guarded by mu_
};

}  // namespace iomm::domain
