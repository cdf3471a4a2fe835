#include "vhost/iotlb.hpp"

#include <string>
#include <vector>

#include "core/check.hpp"
#include "iomm/domain.hpp"
#include "iomm/range.hpp"

namespace iomm::vhost {

Result<Iotlb> Iotlb::create() {
  auto space = AddressSpace::create();
  if (!space) return std::move(space).error();
  return Iotlb(std::move(*space));
}

void Iotlb::remove_overlapping(uint64_t start, uint64_t last) noexcept {
  auto it = entries_.upper_bound(start);
  if (it != entries_.begin()) {
    auto prev = std::prev(it);
    if (prev->second.last >= start) it = prev;
  }
  while (it != entries_.end() && it->first <= last) {
    // Exact mappings of our own, never pinned: unmap cannot fail here.
    auto r = space_.ioas().unmap(it->first, it->second.last - it->first + 1);
    IOMM_CHECK(r.ok(), "unmap of an exact, unpinned IOTLB entry");
    it = entries_.erase(it);
  }
}

Status Iotlb::update(const MemoryTable& table, uint64_t iova, uint64_t size, uint64_t uaddr,
                     uint8_t perm) {
  if (size == 0) return Error(EINVAL, "IOTLB update of size 0");
  if (perm < kAccessRo || perm > kAccessRw)
    return Error(EINVAL, "IOTLB update with permission " + std::to_string(perm));
  auto range = make_range(iova, size);
  if (!range) return Error(EOVERFLOW, "IOTLB update range wraps");
  auto pieces = table.resolve_uaddr(uaddr, size);
  if (!pieces) return std::move(pieces).error();
  auto same = entries_.find(iova);
  if (same != entries_.end() && same->second.last == range->last && same->second.perm == perm &&
      pieces->size() == 1)
    return {};
  remove_overlapping(range->start, range->last);

  const uint32_t prot =
      ((perm & kAccessRo) != 0 ? kProtRead : 0U) | ((perm & kAccessWo) != 0 ? kProtWrite : 0U);
  uint64_t at = iova;
  std::vector<uint64_t> done;
  for (const UaddrPiece& p : *pieces) {
    const MemorySource slice = p.region->source.slice(p.offset, p.length);
    auto mapped = space_.map(slice, prot, at);
    if (!mapped) {
      for (uint64_t start : done) {
        auto r = space_.ioas().unmap(start, entries_.at(start).last - start + 1);
        IOMM_CHECK(r.ok(), "unmap of an exact, unpinned IOTLB entry");
        entries_.erase(start);
      }
      return Error(mapped.code(),
                   "IOTLB update of IOVA " + hex(at) + ": " + mapped.error().message());
    }
    entries_.emplace(at, Entry{at + p.length - 1, perm});
    done.push_back(at);
    at += p.length;
  }
  return {};
}

Status Iotlb::invalidate(uint64_t iova, uint64_t size) {
  if (size == 0) return Error(EINVAL, "IOTLB invalidation of size 0");
  // QEMU invalidates "everything" as [0, UINT64_MAX]: size 2^64 - 1 from 0
  // does not wrap, and a range ending past the top is clamped to it.
  uint64_t last = 0;
  if (__builtin_add_overflow(iova, size - 1, &last)) last = UINT64_MAX;
  remove_overlapping(iova, last);
  return {};
}

void Iotlb::clear() noexcept { remove_overlapping(0, UINT64_MAX); }

std::optional<uint64_t> Iotlb::first_missing(uint64_t iova, uint64_t length,
                                             uint8_t perm) const noexcept {
  if (length == 0) return std::nullopt;
  uint64_t last = 0;
  if (__builtin_add_overflow(iova, length - 1, &last)) last = UINT64_MAX;
  uint64_t pos = iova;
  for (;;) {
    auto it = entries_.upper_bound(pos);
    if (it == entries_.begin()) return pos;
    --it;
    if (it->second.last < pos || (it->second.perm & perm) != perm) return pos;
    if (it->second.last >= last) return std::nullopt;
    pos = it->second.last + 1;
  }
}

}  // namespace iomm::vhost
