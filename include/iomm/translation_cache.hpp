// A translation cache (an IOTLB) in front of one software domain, owned by
// the code that translates: a software device keeps one per thread or
// queue, as a PCIe device keeps its own address translation cache.
//
// Contract
// - Ownership: a cache holds a reference to its domain (the domain lives at
//   least as long as the cache) and is registered with it from create() to
//   its destruction. It is not shared: one thread uses a cache at a time (no
//   locking, no atomic read-modify-write on a hit). About 34 KiB; create it
//   once per thread or queue, not per lookup.
// - Exactness: translate() gives what SoftDomain::translate gives for the
//   same IOVA and access, and never returns a translation removed or
//   changed by an unmap (or a permission change, which is an unmap and a
//   map) that returned before the call began ("before": the caller learned
//   of the return through any synchronisation, as for any other data). The
//   invalidation is pushed, as an IOMMU driver invalidates a device's ATC:
//   every unmap of the domain empties each of its registered caches after
//   clearing the leaves and before it returns (domain/iotlb.hpp), so a hit
//   loads nothing but the cache's own entry. A fill that raced with such an
//   unmap is detected by the cache and dropped before the lookup returns.
//   translate_many() gives the same guarantee for each of its IOVAs.
// - Locking: a hit reads one or two entries of the cache (relaxed atomic
//   loads, which the unmapping thread may be clearing), touches no table,
//   takes no lock and needs no RCU read-side section. A miss is
//   SoftDomain::translate (a lock-free walk inside the caller's RCU guard or
//   its own) plus, when it fills, one fence. create() and the destructor
//   take the domain's cache registry lock (docs/design.md, "Lock order"),
//   which unmaps hold while they empty the caches.
//   The host pointer of a hit is valid exactly as long as that of a walk:
//   while the caller holds an iomm::RcuReadGuard taken before the call.
// - Errors: those of SoftDomain::translate (EINVAL bad access, EFAULT not
//   mapped or outside the aperture, EPERM wrong permission; faults are
//   recorded in the domain's log); translate_many() those of
//   SoftDomain::translate_many. create(): EINVAL null domain, ENOMEM.
// - Policy: kSets sets of two 4 KiB entries, the set chosen by a
//   multiplicative hash of the page (so strided pages spread), the newest
//   fill in way 0, so that a hit is nearly always in way 0 and its branch is
//   predicted. When kMissesToStop misses in a row, with no hit between,
//   evict entries (random lookups over far more pages than the cache holds),
//   filling only costs, so the cache stops filling (hits of what it holds
//   are still served) and samples one walked lookup in kSampleInterval; it
//   resumes when kResumeHits samples in a row find a working set it could
//   hold: the sampled page was among the last kRecent samples' pages, or a
//   lookup hit since the sample before. Samples record pages, not
//   translations, so a batch that is not filling is the domain's batch walk
//   and nothing more.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>

#include "iomm/domain.hpp"
#include "iomm/export.hpp"
#include "iomm/range.hpp"
#include "iomm/result.hpp"

namespace iomm {

namespace domain {
struct Leaf;
class Iotlb;
}  // namespace domain

class IOMM_API TranslationCache {
 public:
  static constexpr unsigned kSetBits = 10;
  static constexpr unsigned kSets = 1U << kSetBits;
  static constexpr unsigned kWays = 2;
  // Misses in a row, each evicting an entry, before filling stops.
  static constexpr unsigned kMissesToStop = 64;
  static constexpr unsigned kSampleInterval = 16;
  static constexpr unsigned kResumeHits = 4;

  static Result<std::unique_ptr<TranslationCache>> create(std::shared_ptr<SoftDomain> domain);
  TranslationCache(const TranslationCache&) = delete;
  TranslationCache& operator=(const TranslationCache&) = delete;
  // Unregisters from the domain (waits for an unmap that is emptying it).
  ~TranslationCache();

  // Translate one IOVA for access (kProtRead and/or kProtWrite). Inline: a
  // hit is a hash, a tag compare and an add, and no call.
  Result<Translation> translate(uint64_t iova, uint32_t access) {
    // access - 1 < 3: kProtRead and/or kProtWrite, nothing else, so that the
    // permission can be part of the tag compare.
    if (access - 1U < 3U) [[likely]] {
      const unsigned set = set_of(iova);
      const uint64_t want = want_of(iova);
      const uint64_t mask = tag_mask(access);
      uint64_t tag = tags_[0][set].load(std::memory_order_relaxed);
      if (((tag ^ want) & mask) == 0) [[likely]]
        return hit(iova, tag, deltas_[0][set]);
      tag = tags_[1][set].load(std::memory_order_relaxed);
      if (((tag ^ want) & mask) == 0) return hit(iova, tag, deltas_[1][set]);
    }
    // Not filling (see Policy): the walk alone, but for the samples.
    if (sampling_ && ++since_sample_ != kSampleInterval) return domain_->translate(iova, access);
    return translate_missed(iova, access);
  }

  // Translate a batch, as SoftDomain::translate_many does (same results,
  // errors and faults): addresses[i] is the address of iovas[i]; the
  // translation stops at the first IOVA that fails. Each translation has
  // translate()'s guarantee. A hit is translate()'s probe, way 0 first;
  // misses are walked one by one while the cache is filling, and the rest of
  // the batch with SoftDomain::translate_many's pipelined walk (every
  // kSampleInterval-th IOVA sampled) once it has stopped.
  BatchResult translate_many(std::span<const uint64_t> iovas, uint32_t access,
                             std::span<uint64_t> addresses);

  // False while the cache has stopped filling (see Policy above).
  [[nodiscard]] bool caching() const noexcept { return !sampling_; }
  [[nodiscard]] SoftDomain& domain() const noexcept { return *domain_; }

 private:
  friend class domain::Iotlb;

  // An entry is a tag and a delta. The tag: the page's IOVA in bits 12..63,
  // the leaf's prot in bits 0..1 (kProtRead, kProtWrite: so that one compare
  // under tag_mask(access) checks page and permission), kHasHost and log2 of
  // the leaf size in bits 3..8; 0 is empty (it matches no access). The
  // delta: the page's host (or synthetic) address minus its IOVA, so that a
  // hit's address is iova + delta. Tags are atomic because an unmap on
  // another thread clears them; deltas only the owner reads and writes.
  static constexpr uint64_t kProtBits = kProtRead | kProtWrite;
  static constexpr uint64_t kHasHost = 1U << 2;
  static constexpr unsigned kSizeShift = 3;
  static constexpr uint64_t kAddressMask = ~(kPageSize - 1);
  static constexpr unsigned kRecentBits = 8;
  static constexpr unsigned kRecent = 1U << kRecentBits;

  // What a tag is compared with: the page with every low bit set, so that
  // the compare under tag_mask(access) needs the entry's access bits set.
  static uint64_t want_of(uint64_t iova) noexcept { return iova | (kPageSize - 1); }
  static uint64_t tag_mask(uint32_t access) noexcept { return kAddressMask | access; }
  // Hashes the page (want_of's low bits are all set whatever the offset).
  static unsigned set_of(uint64_t iova) noexcept {
    return static_cast<unsigned>((want_of(iova) * 0x9e3779b97f4a7c15ULL) >> (64 - kSetBits));
  }

  Result<Translation> hit(uint64_t iova, uint64_t tag, uint64_t delta) noexcept {
    misses_ = 0;
    const uint64_t address = iova + delta;
    const uint64_t size = uint64_t{1} << ((tag >> kSizeShift) & 63U);
    return Translation{
        .iova = iova,
        .host = (tag & kHasHost) != 0 ? reinterpret_cast<void*>(address) : nullptr,
        .address = address,
        .prot = static_cast<uint32_t>(tag & kProtBits),
        .leaf_size = size,
        .contiguous = size - (iova & (size - 1)),
    };
  }

  explicit TranslationCache(std::shared_ptr<SoftDomain> domain) noexcept;
  // Not a hit, and filling or a sample: walk, and fill by the policy.
  Result<Translation> translate_missed(uint64_t iova, uint32_t access);
  // The policy's bookkeeping for a miss of iova in set while filling.
  void note_miss(unsigned set, uint64_t iova) noexcept;
  // The policy's bookkeeping for a sample, while not filling.
  void sample(uint64_t iova) noexcept;
  static unsigned recent_of(uint64_t iova) noexcept {
    return static_cast<unsigned>((want_of(iova) * 0x9e3779b97f4a7c15ULL) >> (64 - kRecentBits));
  }
  // Cache the 4 KiB page of iova in set, from the leaf the walk found, when
  // the page lies wholly inside the aperture (so a hit needs no aperture
  // check).
  void fill(unsigned set, uint64_t iova, const domain::Leaf& leaf) noexcept;
  // After fills from walks that began after epoch was read: drops them all
  // if an unmap emptied the cache since (its emptying may have missed them).
  void settle(uint64_t epoch) noexcept;
  // Empties the cache: by the owner (settle, and when filling resumes) and
  // by invalidate().
  void clear() noexcept;
  // An unmap's, on any thread, under the domain's registry lock (shared: two
  // unmaps may empty the same cache at once): bumps the epoch, then clear()
  // (the ordering argument is in domain/iotlb.hpp).
  void invalidate() noexcept;
  // translate_many from index i on, while not filling: the domain's
  // pipelined walk, then the samples among the IOVAs it visited.
  BatchResult translate_sampling(std::span<const uint64_t> iovas, size_t i, uint32_t access,
                                 std::span<uint64_t> addresses);

  // First, so that a hit addresses them from the object at no offset.
  std::atomic<uint64_t> tags_[kWays][kSets] = {};
  uint64_t deltas_[kWays][kSets] = {};
  std::shared_ptr<SoftDomain> domain_;
  // While filling: misses in a row that evicted an entry. While sampling: 0
  // when a lookup hit since the last sample. Every hit sets it to 0.
  unsigned misses_ = 0;
  bool sampling_ = false;
  unsigned since_sample_ = 0;    // walked lookups since the last sample
  unsigned useful_samples_ = 0;  // samples in a row that found the cache useful
  // The pages of recent samples (want_of), hashed: a sample whose page is
  // here was sampled lately, so the lookups have a working set the cache
  // could hold. Pages only, never translations, so nothing to invalidate.
  uint64_t recent_[kRecent] = {};
  // Bumped by every invalidation; a fill compares it before and after.
  std::atomic<uint64_t> epoch_{0};
  // The domain's registered caches (domain::Iotlb), guarded by its lock.
  TranslationCache* prev_ = nullptr;
  TranslationCache* next_ = nullptr;
};

}  // namespace iomm
