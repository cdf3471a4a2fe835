#include "vhost/desc_chain.hpp"

#include <string>

namespace iomm::vhost {

namespace {

constexpr uint64_t kMaxChainBytes = UINT32_MAX;

}  // namespace

Status add_segment(const VringDesc& d, DescChain& out) {
  const bool writable = (d.flags & kVringDescFWrite) != 0;
  // The last buffer, not the byte count: a zero-length writable buffer
  // still ends the readable part (the fuzzer found that one).
  if (!writable && !out.segments.empty() && out.segments.back().device_writable)
    return Error(EINVAL, "device-readable descriptor after a device-writable one");
  uint64_t& total = writable ? out.writable_bytes : out.readable_bytes;
  total += d.len;
  if (out.readable_bytes + out.writable_bytes > kMaxChainBytes)
    return Error(EINVAL, "descriptor chain longer than 4 GiB");
  out.segments.push_back(BufferSegment{d.addr, d.len, writable});
  return {};
}

Status walk_indirect(const AddressSpace& space, const VringDesc& ind, uint16_t queue_size,
                     DescChain& out) {
  if (ind.len == 0 || ind.len % sizeof(VringDesc) != 0)
    return Error(EINVAL, "indirect table of " + std::to_string(ind.len) +
                             " bytes (not a non-zero multiple of 16)");
  const uint32_t count = ind.len / sizeof(VringDesc);
  if (count > queue_size)
    return Error(EINVAL, "indirect table of " + std::to_string(count) +
                             " descriptors is longer than the queue");
  out.table.resize(count);
  if (Status s = space.read(ind.addr, out.table.data(), ind.len); !s) return s;
  uint32_t index = 0;
  for (uint32_t visited = 0;; ++visited) {
    if (visited >= count) return Error(EINVAL, "indirect chain longer than its table (a loop?)");
    const VringDesc& d = out.table[index];
    if ((d.flags & kVringDescFIndirect) != 0)
      return Error(EINVAL, "indirect descriptor inside an indirect table");
    if (Status s = add_segment(d, out); !s) return s;
    if ((d.flags & kVringDescFNext) == 0) return {};
    index = d.next;
    if (index >= count)
      return Error(EINVAL, "indirect next " + std::to_string(index) + " outside its table");
  }
}

}  // namespace iomm::vhost
