// Walking one descriptor chain of a split virtqueue into the buffers it
// names (virtio 1.x, 2.7.5 and 2.7.7), refusing every malformed shape.
//
// Contract
// - A chain is the head's descriptors followed through F_NEXT, or, when the
//   head has F_INDIRECT, the indirect table it points at (an indirect
//   descriptor anywhere else is refused, as QEMU's and libvhost-user's
//   devices do). It never visits more descriptors than the queue (or the
//   indirect table) holds, so a loop ends as EINVAL, not a hang.
// - Device-readable buffers come first; a readable one after a writable
//   one is refused. The total length must fit in 32 bits (the used ring's
//   length field).
// - Errors: EINVAL a malformed chain (head or next out of range, a loop or
//   a chain longer than the queue, F_INDIRECT with F_NEXT, nested or
//   misplaced indirect, an indirect table whose length is 0, not a multiple
//   of 16 or longer than the queue, indirect without
//   VIRTIO_RING_F_INDIRECT_DESC, readable after writable, too many bytes);
//   errors of reading the ring or the table (ENOENT unmapped or an IOTLB
//   miss: the space's last_fault() names it; EPERM; EFAULT; EOVERFLOW an
//   indirect table whose address range wraps).
// - `out` is reused across calls (its vectors keep their capacity).
#pragma once

#include <cstdint>
#include <vector>

#include "iomm/result.hpp"
#include "iomm/vring_cache.hpp"
#include "vhost/address_space.hpp"

namespace iomm::vhost {

struct BufferSegment {
  uint64_t addr = 0;
  uint32_t len = 0;
  bool device_writable = false;
};

struct DescChain {
  uint16_t head = 0;
  std::vector<BufferSegment> segments;
  uint64_t readable_bytes = 0;
  uint64_t writable_bytes = 0;
  std::vector<VringDesc> table;  // scratch for an indirect table
};

// Where the descriptors come from: the ring, or anything with the same
// desc() (the fuzz target feeds a plain array).
template <typename Ring>
Status read_chain(Ring& ring, const AddressSpace& space, uint16_t head, bool indirect_allowed,
                  DescChain& out);

Status walk_indirect(const AddressSpace& space, const VringDesc& ind, uint16_t queue_size,
                     DescChain& out);
Status add_segment(const VringDesc& d, DescChain& out);

template <typename Ring>
Status read_chain(Ring& ring, const AddressSpace& space, uint16_t head, bool indirect_allowed,
                  DescChain& out) {
  out.head = head;
  out.segments.clear();
  out.readable_bytes = 0;
  out.writable_bytes = 0;
  const uint16_t size = ring.layout().size;
  if (head >= size)
    return Error(EINVAL,
                 "chain head " + std::to_string(head) + " >= queue size " + std::to_string(size));
  uint16_t index = head;
  for (uint32_t visited = 0;; ++visited) {
    if (visited >= size) return Error(EINVAL, "descriptor chain longer than the queue (a loop?)");
    auto d = ring.desc(index);
    if (!d) return std::move(d).error();
    if ((d->flags & kVringDescFIndirect) != 0) {
      if (!indirect_allowed)
        return Error(EINVAL, "indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC");
      if (visited != 0) return Error(EINVAL, "indirect descriptor that is not the chain's head");
      if ((d->flags & kVringDescFNext) != 0)
        return Error(EINVAL, "indirect descriptor with F_NEXT");
      return walk_indirect(space, *d, size, out);
    }
    if (Status s = add_segment(*d, out); !s) return s;
    if ((d->flags & kVringDescFNext) == 0) return {};
    index = d->next;
    if (index >= size)
      return Error(EINVAL, "descriptor next " + std::to_string(index) + " >= queue size");
  }
}

}  // namespace iomm::vhost
