// A translation cache (an IOTLB) in front of one software domain, owned by
// the code that translates: a software device keeps one per thread or
// queue, as a PCIe device keeps its own address translation cache.
//
// Contract
// - Ownership: a cache holds a reference to its domain (the domain lives at
//   least as long as the cache). It is not shared: one thread uses a cache
//   at a time (no locking, no atomic read-modify-write on a hit). About
//   16 KiB; create it once per thread or queue, not per lookup.
// - Exactness: translate() gives what SoftDomain::translate gives for the
//   same IOVA and access, and never returns a translation removed or
//   changed by an unmap (or a permission change, which is an unmap and a
//   map) that returned before the call began. Every unmap gives the domain a
//   new generation. The cache's entries are all valid under one generation,
//   read before each walk that filled them; a lookup hits only while the
//   domain's generation is still that one, and the first miss after it
//   changed empties the cache.
// - Locking: a hit reads the domain's generation (one atomic load) and one
//   set of the cache, touches no table and needs no RCU read-side section.
//   A miss is SoftDomain::translate (a lock-free walk inside the caller's
//   RCU guard or its own). The host pointer of a hit is valid exactly as
//   long as that of a walk: while the caller holds an iomm::RcuReadGuard
//   taken before the call.
// - Errors: those of SoftDomain::translate (EINVAL bad access, EFAULT not
//   mapped or outside the aperture, EPERM wrong permission; faults are
//   recorded in the domain's log). create(): EINVAL null domain, ENOMEM.
// - Policy: kSets sets of two 4 KiB entries, the set chosen by a
//   multiplicative hash of the page (so strided pages spread), the newest
//   fill in way 0. When misses keep evicting entries that never hit (random
//   lookups over far more pages than the cache holds), filling only costs,
//   so the cache stops probing and filling and samples one lookup in
//   kSampleInterval; it resumes when kResumeHits samples in a row hit.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "iomm/domain.hpp"
#include "iomm/export.hpp"
#include "iomm/range.hpp"
#include "iomm/result.hpp"

namespace iomm {

class IOMM_API TranslationCache {
 public:
  static constexpr unsigned kSetBits = 9;
  static constexpr unsigned kSets = 1U << kSetBits;
  static constexpr unsigned kWays = 2;
  // Misses in a row that evict an entry which never hit before caching stops.
  static constexpr unsigned kWastedFillsToStop = 64;
  static constexpr unsigned kSampleInterval = 16;
  static constexpr unsigned kResumeHits = 4;

  static Result<std::unique_ptr<TranslationCache>> create(std::shared_ptr<SoftDomain> domain);
  TranslationCache(const TranslationCache&) = delete;
  TranslationCache& operator=(const TranslationCache&) = delete;
  ~TranslationCache();

  // Translate one IOVA for access (kProtRead and/or kProtWrite). Inline: a
  // hit is a handful of instructions and no call.
  Result<Translation> translate(uint64_t iova, uint32_t access) {
    if (generation_->load(std::memory_order_seq_cst) == armed_generation_) {
      Entry* set = sets_[set_of(iova)].way;
      const uint64_t tag = tag_of(iova);
      // Which way is computed, not branched on: in a hot set both are common.
      Entry* hit = &set[set[1].tag == tag ? 1 : 0];
      if (hit->tag == tag) {
        const uint64_t word = hit->word;
        if (access != 0 && (access & ~static_cast<uint32_t>(word & kProtMask)) == 0) {
          if ((word & kUsed) == 0) hit->word = word | kUsed;
          const uint64_t size = uint64_t{1} << ((word >> kSizeShift) & 63U);
          const uint64_t address = (word & kAddressMask) + (iova & (kPageSize - 1));
          return Translation{
              .iova = iova,
              .host = (word & kHasHost) != 0 ? reinterpret_cast<void*>(address) : nullptr,
              .address = address,
              .prot = static_cast<uint32_t>(word & kProtMask),
              .leaf_size = size,
              .contiguous = size - (iova & (size - 1)),
          };
        }
      }
    }
    // Not filling (see Policy): the walk alone, but for the samples.
    if (sampling_ && ++since_sample_ != kSampleInterval) return domain_->translate(iova, access);
    return translate_missed(iova, access);
  }

  // False while the cache has stopped filling (see Policy above).
  [[nodiscard]] bool caching() const noexcept { return !sampling_; }
  [[nodiscard]] SoftDomain& domain() const noexcept { return *domain_; }

 private:
  // One cached 4 KiB page. tag: the page's IOVA with bit 0 set (0: empty).
  // word: the page's host (or synthetic) address in bits 12..63; prot in
  // bits 0..1; kHasHost; log2 of the leaf size in bits 4..9; kUsed once it
  // has hit.
  struct Entry {
    uint64_t tag = 0;
    uint64_t word = 0;
  };
  struct alignas(kWays * sizeof(Entry)) Set {
    Entry way[kWays];
  };
  static constexpr uint64_t kProtMask = 3;
  static constexpr uint64_t kHasHost = 1U << 2;
  static constexpr unsigned kSizeShift = 4;
  static constexpr uint64_t kUsed = 1U << 10;
  static constexpr uint64_t kAddressMask = ~(kPageSize - 1);

  static uint64_t tag_of(uint64_t iova) noexcept { return (iova & kAddressMask) | 1U; }
  static unsigned set_of(uint64_t iova) noexcept {
    return static_cast<unsigned>(((iova >> kPageShift) * 0x9e3779b97f4a7c15ULL) >> (64 - kSetBits));
  }

  TranslationCache(std::shared_ptr<SoftDomain> domain,
                   const std::atomic<uint64_t>* generation) noexcept;
  // Not a hit, and filling or a sample: walk, and fill by the policy.
  Result<Translation> translate_missed(uint64_t iova, uint32_t access);

  std::shared_ptr<SoftDomain> domain_;
  const std::atomic<uint64_t>* generation_;  // the domain's; lives as long as domain_
  // The generation every entry is valid under (0, never a generation: none).
  uint64_t valid_generation_ = 0;
  // What a hit requires the domain's generation to be: valid_generation_,
  // or 0 while sampling, so that the hit path needs no second test.
  uint64_t armed_generation_ = 0;
  bool sampling_ = false;
  unsigned wasted_fills_ = 0;  // misses in a row that evicted a never-hit entry
  unsigned since_sample_ = 0;
  unsigned sampled_hits_ = 0;  // samples in a row that would have hit
  Set sets_[kSets];
};

}  // namespace iomm
