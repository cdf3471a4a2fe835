#include "vhost/vring.hpp"

#include <atomic>

#include "iomm/range.hpp"

namespace iomm::vhost {

namespace {

// Split ring layout (virtio 1.x, 2.7): avail = flags, idx, ring[size],
// used_event; used = flags, idx, ring[size] of {id, len}, avail_event.
constexpr uint64_t kAvailRing = 4;
constexpr uint64_t kUsedRing = 4;
constexpr uint64_t kUsedElem = 8;

}  // namespace

Result<Vring> Vring::create(const AddressSpace& space, const VringLayout& layout) {
  const uint32_t n = layout.size;
  if (n == 0 || n > 32768 || (n & (n - 1)) != 0)
    return Error(EINVAL, "virtqueue size " + std::to_string(n) + " is not a power of two <= 32768");
  if (!is_aligned(layout.desc_iova, 16) || !is_aligned(layout.avail_iova, 2) ||
      !is_aligned(layout.used_iova, 4))
    return Error(EINVAL, "misaligned virtqueue rings");
  const uint64_t extra = layout.event_idx ? 2 : 0;
  if (!make_range(layout.desc_iova, 16ULL * n) ||
      !make_range(layout.avail_iova, kAvailRing + 2ULL * n + extra) ||
      !make_range(layout.used_iova, kUsedRing + kUsedElem * n + extra))
    return Error(EINVAL, "a virtqueue ring wraps the address space");
  return Vring(space, layout);
}

Result<uint16_t> Vring::read16(uint64_t addr) {
  uint16_t v = 0;
  if (Status s = space_->read(addr, &v, sizeof(v)); !s) return s.error();
  return v;
}

Status Vring::write16(uint64_t addr, uint16_t value) {
  return space_->write(addr, &value, sizeof(value));
}

Result<uint16_t> Vring::avail_flags() { return read16(layout_.avail_iova); }

Result<uint16_t> Vring::avail_idx() {
  auto r = read16(layout_.avail_iova + 2);
  std::atomic_thread_fence(std::memory_order_acquire);
  return r;
}

Result<uint16_t> Vring::avail_entry(uint16_t slot) {
  return read16(layout_.avail_iova + kAvailRing + 2ULL * (slot & (layout_.size - 1)));
}

Result<uint16_t> Vring::used_event() {
  if (!layout_.event_idx) return Error(EINVAL, "used_event without VIRTIO_RING_F_EVENT_IDX");
  return read16(layout_.avail_iova + kAvailRing + 2ULL * layout_.size);
}

Result<VringDesc> Vring::desc(uint16_t index) {
  if (index >= layout_.size)
    return Error(EINVAL, "descriptor index " + std::to_string(index) + " >= queue size " +
                             std::to_string(layout_.size));
  VringDesc d;
  static_assert(sizeof(VringDesc) == 16);
  if (Status s = space_->read(layout_.desc_iova + 16ULL * index, &d, sizeof(d)); !s)
    return s.error();
  return d;
}

Status Vring::set_used_entry(uint16_t slot, uint32_t id, uint32_t len) {
  const uint32_t elem[2] = {id, len};
  return space_->write(layout_.used_iova + kUsedRing + kUsedElem * (slot & (layout_.size - 1)),
                       elem, sizeof(elem));
}

Status Vring::set_used_idx(uint16_t idx) {
  std::atomic_thread_fence(std::memory_order_release);
  return write16(layout_.used_iova + 2, idx);
}

Result<uint16_t> Vring::used_idx() { return read16(layout_.used_iova + 2); }

Status Vring::set_used_flags(uint16_t flags) { return write16(layout_.used_iova, flags); }

Status Vring::set_avail_event(uint16_t idx) {
  if (!layout_.event_idx) return Error(EINVAL, "avail_event without VIRTIO_RING_F_EVENT_IDX");
  const Status s = write16(layout_.used_iova + kUsedRing + kUsedElem * layout_.size, idx);
  // The event index must be visible before the avail index is read again,
  // or a kick the driver skipped because of the old value is lost.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return s;
}

}  // namespace iomm::vhost
