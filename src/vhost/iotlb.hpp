// The device IOTLB of a vhost-user back end with VIRTIO_F_ACCESS_PLATFORM:
// an iomm Ioas in IOVA space. UPDATE maps the front-end address range it
// names (resolved through the memory table to the regions' sources) at the
// IOVA; INVALIDATE unmaps every entry it touches.
//
// Contract
// - Ownership: the IOTLB owns its address space; entries hold slices of
//   the memory table's sources, so they stay valid (and safe) even if the
//   table is replaced; the back end clears the IOTLB on a new table anyway.
// - An IOTLB is a cache: invalidating more than asked is correct, less is
//   not. An INVALIDATE that cuts an entry removes the whole entry (the Ioas
//   never splits a mapping); the next access misses and the front end
//   sends it again. An UPDATE overlapping entries replaces them.
// - update() is all-or-nothing. Errors: EINVAL zero size, a bad permission;
//   EOVERFLOW the range wraps; ENOENT the front-end range is not all in the
//   memory table; EPERM write permission on a read-only region; errors of
//   Ioas::map (EINVAL an IOVA or address not page aligned, ENOSPC).
// - invalidate() cannot fail for lack of memory; EOVERFLOW/EINVAL for a bad
//   range.
// - One thread (the back end's) calls it.
#pragma once

#include <cstdint>
#include <map>
#include <optional>

#include "iomm/result.hpp"
#include "vhost/address_space.hpp"
#include "vhost/memory_table.hpp"

namespace iomm::vhost {

class Iotlb {
 public:
  static Result<Iotlb> create();

  Status update(const MemoryTable& table, uint64_t iova, uint64_t size, uint64_t uaddr,
                uint8_t perm);
  Status invalidate(uint64_t iova, uint64_t size);
  // Drop every entry.
  void clear() noexcept;

  // The first address of [iova, iova + length) that no entry allowing
  // `perm` (kAccessRo/kAccessWo) covers, or nullopt if all of it is covered.
  [[nodiscard]] std::optional<uint64_t> first_missing(uint64_t iova, uint64_t length,
                                                      uint8_t perm) const noexcept;
  [[nodiscard]] const AddressSpace& space() const noexcept { return space_; }
  [[nodiscard]] size_t entries() const noexcept { return entries_.size(); }

 private:
  struct Entry {
    uint64_t last;
    uint8_t perm;
  };
  explicit Iotlb(AddressSpace space) : space_(std::move(space)) {}
  void remove_overlapping(uint64_t start, uint64_t last) noexcept;

  AddressSpace space_;
  std::map<uint64_t, Entry> entries_;  // by first IOVA
};

}  // namespace iomm::vhost
