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
//   changed empties the cache. translate_many() reads the generation once,
//   at its start, and empties the cache then if it changed: each of its
//   translations has translate()'s guarantee relative to the start of the
//   batch (an unmap that returns while the batch runs may or may not be
//   seen by the IOVAs after it, as for a walk).
// - Locking: a hit reads the domain's generation (one atomic load; none
//   inside a batch) and one set of the cache, touches no table and needs no
//   RCU read-side section. A miss is SoftDomain::translate (a lock-free
//   walk inside the caller's RCU guard or its own). The host pointer of a
//   hit is valid exactly as long as that of a walk: while the caller holds
//   an iomm::RcuReadGuard taken before the call.
// - Errors: those of SoftDomain::translate (EINVAL bad access, EFAULT not
//   mapped or outside the aperture, EPERM wrong permission; faults are
//   recorded in the domain's log); translate_many() those of
//   SoftDomain::translate_many. create(): EINVAL null domain, ENOMEM.
// - Policy: kSets sets of two 4 KiB entries, the set chosen by a
//   multiplicative hash of the page (so strided pages spread), the newest
//   fill in way 0. When kMissesToStop misses in a row, with no hit between,
//   evict entries (random lookups over far more pages than the cache holds),
//   filling only costs, so the cache stops probing and filling and samples
//   one lookup in kSampleInterval; it resumes when kResumeHits samples in a
//   row would have hit.
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
}

class IOMM_API TranslationCache {
 public:
  static constexpr unsigned kSetBits = 9;
  static constexpr unsigned kSets = 1U << kSetBits;
  static constexpr unsigned kWays = 2;
  // Misses in a row, each evicting an entry, before caching stops.
  static constexpr unsigned kMissesToStop = 64;
  static constexpr unsigned kSampleInterval = 16;
  static constexpr unsigned kResumeHits = 4;

  static Result<std::unique_ptr<TranslationCache>> create(std::shared_ptr<SoftDomain> domain);
  TranslationCache(const TranslationCache&) = delete;
  TranslationCache& operator=(const TranslationCache&) = delete;
  ~TranslationCache();

  // Translate one IOVA for access (kProtRead and/or kProtWrite). Inline: a
  // hit is a handful of instructions and no call.
  Result<Translation> translate(uint64_t iova, uint32_t access) {
    // access - 1 < 3: kProtRead and/or kProtWrite, nothing else, so that the
    // permission can be part of the tag compare.
    if (access - 1U < 3U && generation_->load(std::memory_order_seq_cst) == armed_generation_) {
      Entry* set = sets_[set_of(iova)].way;
      const uint64_t mask = tag_mask(access);
      const uint64_t want = tag_of(iova) | tag_prot(access);
      // Which way is computed, not branched on: in a hot set both are common.
      Entry* hit = &set[((set[1].tag ^ want) & mask) == 0 ? 1 : 0];
      if (((hit->tag ^ want) & mask) == 0) {
        evicting_misses_ = 0;
        const uint64_t tag = hit->tag;
        const uint64_t address = hit->page | (iova & (kPageSize - 1));
        const uint64_t size = uint64_t{1} << ((tag >> kSizeShift) & 63U);
        return Translation{
            .iova = iova,
            .host = (tag & kHasHost) != 0 ? reinterpret_cast<void*>(address) : nullptr,
            .address = address,
            .prot = static_cast<uint32_t>(tag >> kTagProtShift) & 3U,
            .leaf_size = size,
            .contiguous = size - (iova & (size - 1)),
        };
      }
    }
    // Not filling (see Policy): the walk alone, but for the samples.
    if (sampling_ && ++since_sample_ != kSampleInterval) return domain_->translate(iova, access);
    return translate_missed(iova, access);
  }

  // Translate a batch, as SoftDomain::translate_many does (same results,
  // errors and faults): addresses[i] is the address of iovas[i]; the
  // translation stops at the first IOVA that fails. The domain's generation
  // is read once, at the start (so no translation an unmap removed before
  // the call began is returned); a hit then is a probe of one set and no
  // load of the generation. Misses are walked one by one while the cache is
  // filling, and the rest of the batch with SoftDomain::translate_many's
  // pipelined walk once it samples.
  BatchResult translate_many(std::span<const uint64_t> iovas, uint32_t access,
                             std::span<uint64_t> addresses);

  // False while the cache has stopped filling (see Policy above).
  [[nodiscard]] bool caching() const noexcept { return !sampling_; }
  [[nodiscard]] SoftDomain& domain() const noexcept { return *domain_; }

 private:
  // One cached 4 KiB page, 16 bytes. tag: the page's IOVA, kTagValid, the
  // leaf's prot in bits 1..2 (so that one compare under tag_mask(access)
  // checks page and permission), kHasHost and log2 of the leaf size in bits
  // 4..9 (0: empty). page: the page's host (or synthetic) address, so that
  // a hit's address is page | offset.
  struct Entry {
    uint64_t tag = 0;
    uint64_t page = 0;
  };
  struct alignas(kWays * sizeof(Entry)) Set {
    Entry way[kWays];
  };
  static constexpr uint64_t kTagValid = 1;
  static constexpr unsigned kTagProtShift = 1;
  static constexpr uint64_t kHasHost = 1U << 3;
  static constexpr unsigned kSizeShift = 4;
  static constexpr uint64_t kAddressMask = ~(kPageSize - 1);

  static uint64_t tag_of(uint64_t iova) noexcept { return (iova & kAddressMask) | kTagValid; }
  static uint64_t tag_prot(uint32_t access) noexcept {
    return static_cast<uint64_t>(access & 3U) << kTagProtShift;
  }
  // The tag bits a hit for access must match: the page, kTagValid and the
  // access's permission bits (the others the entry may have or not).
  static uint64_t tag_mask(uint32_t access) noexcept {
    return kAddressMask | kTagValid | tag_prot(access);
  }
  static unsigned set_of(uint64_t iova) noexcept {
    return static_cast<unsigned>(((iova >> kPageShift) * 0x9e3779b97f4a7c15ULL) >> (64 - kSetBits));
  }

  TranslationCache(std::shared_ptr<SoftDomain> domain,
                   const std::atomic<uint64_t>* generation) noexcept;
  // Not a hit, and filling or a sample: walk, and fill by the policy.
  Result<Translation> translate_missed(uint64_t iova, uint32_t access);
  // Empties the cache if the domain's generation moved on from the one its
  // entries are valid under. Called before any walk whose leaf may fill.
  void refresh_generation() noexcept;
  // The policy's bookkeeping for a miss or a sample of iova, which maps to
  // set.
  void note_probe(const Set& set, uint64_t iova) noexcept;
  // Cache the 4 KiB page of iova in set, from the leaf the walk found, when
  // the page lies wholly inside the aperture (so a hit needs no aperture
  // check).
  void fill(Set& set, uint64_t iova, const domain::Leaf& leaf) noexcept;
  // translate_many from index i on, while sampling: the domain's pipelined
  // walk, with every kSampleInterval-th IOVA probed and filled.
  BatchResult translate_sampling(std::span<const uint64_t> iovas, size_t i, uint32_t access,
                                 uint64_t* addresses);

  std::shared_ptr<SoftDomain> domain_;
  const std::atomic<uint64_t>* generation_;  // the domain's; lives as long as domain_
  // The generation every entry is valid under (0, never a generation: none).
  uint64_t valid_generation_ = 0;
  // What a hit requires the domain's generation to be: valid_generation_,
  // or 0 while sampling, so that the hit path needs no second test.
  uint64_t armed_generation_ = 0;
  bool sampling_ = false;
  unsigned evicting_misses_ = 0;  // misses in a row that evicted an entry
  unsigned since_sample_ = 0;
  unsigned sampled_hits_ = 0;  // samples in a row that would have hit
  Set sets_[kSets];
};

}  // namespace iomm
