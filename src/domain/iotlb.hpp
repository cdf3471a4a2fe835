// The IOTLB of software domains: a cache of recent translations checked
// before the page-table walk, as a hardware IOMMU keeps one.
//
// Shape: each thread has its own direct-mapped cache of kIotlbSlots 4 KiB
// translations (like a CPU core's TLB), shared by every domain the thread
// translates through. A slot holds the IOVA page, the leaf's data for that
// page, and the generation of the domain it was filled under. Only its own
// thread writes or reads a slot, so filling needs no atomic read-modify-write
// and cannot tear.
//
// Invalidation: every domain has a generation, drawn from one process-wide
// counter, so no two domains ever share one and a slot of another (or a
// destroyed) domain never matches. A lookup hits only when the slot's
// generation equals the domain's current one. The page table calls
// invalidate() after every change that clears or replaces a leaf (unmap, the
// undo of a failed map, live update) and before its caller waits for
// readers. A translation is filled with the generation read *before* its
// walk, so a walk that raced with an unmap fills a slot that is already
// stale and never hits. Ordering: leaves are cleared with release stores,
// then the generation is replaced (seq_cst); a lookup loads the generation
// (seq_cst) before it probes or walks, so a lookup that begins after an unmap
// completed sees the new generation, misses every older slot, and its walk
// sees the cleared leaves. Maps need no invalidation: they only fill empty
// slots of the table, and the cache holds only present translations.
#pragma once

#include <atomic>
#include <cstdint>

#include "mem/host_access.hpp"

namespace iomm::domain {

inline constexpr unsigned kIotlbSlots = 512;

namespace iotlb {
// One cached 4 KiB translation. word: the host address of the page (bits
// 12..63), prot (bits 0..1), host access (bits 2..3), log2 of the leaf size
// (bits 4..9).
struct alignas(32) Slot {
  uint64_t page = 0;        // iova >> 12
  uint64_t generation = 0;  // 0 is never a generation: an untouched slot never hits
  uint64_t word = 0;
};
inline constexpr uint64_t kPageMask = ~uint64_t{4095};
inline constexpr unsigned kHostAccessShift = 2;
inline constexpr unsigned kSizeShift = 4;
// This thread's slots: zero-initialised, so access needs no guard.
extern constinit thread_local Slot t_slots[kIotlbSlots];
}  // namespace iotlb

class Iotlb {
 public:
  Iotlb() noexcept;
  Iotlb(const Iotlb&) = delete;
  Iotlb& operator=(const Iotlb&) = delete;

  // Drop every cached translation of this domain (a new generation).
  void invalidate() noexcept;

  // The generation a lookup checks against and a fill records; read it once,
  // before probing and walking.
  [[nodiscard]] uint64_t generation() const noexcept {
    return generation_.load(std::memory_order_seq_cst);
  }

  // The cached translation of iova's page under generation, if any, into a
  // page-table Leaf (a template so this header does not need the page table's,
  // which includes it). Inline: it is the translate() hot path.
  template <typename Leaf>
  static bool lookup(uint64_t iova, uint64_t generation, Leaf* out) noexcept {
    const uint64_t page = iova >> 12;
    const iotlb::Slot& s = iotlb::t_slots[page & (kIotlbSlots - 1)];
    if (s.page != page || s.generation != generation) return false;
    const uint64_t size = uint64_t{1} << ((s.word >> iotlb::kSizeShift) & 63U);
    out->address = (s.word & iotlb::kPageMask) + (iova & 4095);
    out->prot = static_cast<uint32_t>(s.word & 3U);
    out->host_access = static_cast<mem::HostAccess>((s.word >> iotlb::kHostAccessShift) & 3U);
    out->size = size;
    out->remaining = size - (iova & (size - 1));
    return true;
  }
  // Remember leaf (looked up for iova) under generation.
  template <typename Leaf>
  static void fill(uint64_t iova, uint64_t generation, const Leaf& leaf) noexcept {
    const uint64_t page = iova >> 12;
    iotlb::Slot& s = iotlb::t_slots[page & (kIotlbSlots - 1)];
    s.page = page;
    s.generation = generation;
    s.word = (leaf.address & iotlb::kPageMask) | (leaf.prot & 3U) |
             (static_cast<uint64_t>(leaf.host_access) << iotlb::kHostAccessShift) |
             (static_cast<uint64_t>(__builtin_ctzll(leaf.size)) << iotlb::kSizeShift);
  }

 private:
  std::atomic<uint64_t> generation_;
};

}  // namespace iomm::domain
