// Executing one virtio-blk request (virtio 1.x, 5.2.6) described by a
// descriptor chain: the 16-byte header in the device-readable buffers, the
// data, and the status byte as the last device-writable byte.
//
// Contract
// - Every malformed or failing request completes with VIRTIO_BLK_S_IOERR
//   (VIRTIO_BLK_S_UNSUPP for an unknown type) and a reason in `problem`:
//   no header, data not a multiple of 512 bytes, a range past the end of
//   the image, a write to a read-only image, a buffer outside guest memory,
//   an image I/O error. A chain with no writable byte cannot carry a
//   status: it completes with used length 0.
// - A write is reported done only when every byte reached the image: the
//   data is gathered from guest memory before the first byte is written.
// - An IOTLB miss (ENOENT while `retry_on_miss`) returns ENOENT before the
//   completion is visible: the request has had no effect the driver can
//   see (a read may have filled part of its buffers, a write may have
//   written the same bytes), so running it again later is correct.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "iomm/result.hpp"
#include "vhost/address_space.hpp"
#include "vhost/blk_image.hpp"
#include "vhost/desc_chain.hpp"

namespace iomm::vhost {

// Requests larger than this complete with IOERR (the device offers no
// SIZE_MAX, so it bounds what it buffers itself).
inline constexpr uint64_t kMaxBlkRequestBytes = 32ULL << 20;

struct BlkCompletion {
  uint32_t used_len = 0;
  uint8_t status = 0;
  std::string problem;  // why the request failed, empty if it did not
};

Result<BlkCompletion> execute_blk_request(const BlkImage& image, const AddressSpace& space,
                                          const DescChain& chain, bool retry_on_miss,
                                          std::vector<uint8_t>& bounce);

}  // namespace iomm::vhost
