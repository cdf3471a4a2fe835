// A split virtqueue's rings (descriptor table, available ring, used ring)
// read and written through an AddressSpace with translated, bounds-checked
// copies. Its interface is iomm::VringCache's (iomm/vring_cache.hpp), so
// the back end can move to cached pointers kept valid by interval
// notifiers without touching the data path.
//
// Contract
// - Addresses are in the space's address space (GPA or IOVA); nothing is
//   cached: every call translates, so an IOTLB invalidation takes effect at
//   the next access with no further step.
// - Memory ordering: avail_idx() is followed by an acquire fence (entries up
//   to it are read after it); set_used_idx() is preceded by a release fence.
// - Errors: ENOENT part of a ring is not mapped (outside guest memory, or an
//   IOTLB miss), EPERM no permission, EFAULT memory gone; create(): EINVAL
//   size not a power of two in [1, 32768], misaligned rings (desc 16,
//   avail 2, used 4), a ring that wraps; desc(): EINVAL index >= size.
// - One thread per ring.
#pragma once

#include <cstdint>

#include "iomm/result.hpp"
#include "iomm/vring_cache.hpp"
#include "vhost/address_space.hpp"

namespace iomm::vhost {

class Vring {
 public:
  static Result<Vring> create(const AddressSpace& space, const VringLayout& layout);

  Result<uint16_t> avail_flags();
  Result<uint16_t> avail_idx();
  Result<uint16_t> avail_entry(uint16_t slot);
  Result<uint16_t> used_event();
  Result<VringDesc> desc(uint16_t index);
  Status set_used_entry(uint16_t slot, uint32_t id, uint32_t len);
  Status set_used_idx(uint16_t idx);
  Result<uint16_t> used_idx();
  Status set_used_flags(uint16_t flags);
  Status set_avail_event(uint16_t idx);

  [[nodiscard]] const VringLayout& layout() const noexcept { return layout_; }

 private:
  Vring(const AddressSpace& space, const VringLayout& layout) : space_(&space), layout_(layout) {}
  Result<uint16_t> read16(uint64_t addr);
  Status write16(uint64_t addr, uint16_t value);

  const AddressSpace* space_;
  VringLayout layout_;
};

}  // namespace iomm::vhost
