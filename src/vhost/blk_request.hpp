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
// - Data moves between the image and guest memory directly: the host runs
//   of every data buffer (AddressSpace::segments, the library's own mapping
//   of the front end's files) are resolved before the first byte moves, then
//   one preadv/pwritev loop moves the data. So a buffer that is not all in
//   guest memory (or not all in the IOTLB) fails before any byte of the
//   request moves, and nothing outside guest memory is ever touched.
// - Guest memory that vanishes during the I/O (a memory file truncated
//   under its mapping) makes the system call fail with EFAULT or return
//   short, never raise SIGBUS: the request completes with IOERR. A write is
//   reported done only when every byte reached the image; a write that
//   failed part way (IOERR) may have changed part of its sectors, as a
//   failed write to a disk may.
// - An IOTLB miss (ENOENT while `retry_on_miss`) returns ENOENT before the
//   completion is visible and before any data moved (the header may have
//   been read), so running it again later is correct.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <string>
#include <vector>

#include "iomm/ioas.hpp"
#include "iomm/result.hpp"
#include "vhost/address_space.hpp"
#include "vhost/blk_image.hpp"
#include "vhost/desc_chain.hpp"

namespace iomm::vhost {

// Requests larger than this complete with IOERR (the device offers no
// SIZE_MAX; it bounds the I/O one request may ask for).
inline constexpr uint64_t kMaxBlkRequestBytes = 32ULL << 20;

// Reused across requests (keeps its capacity).
struct BlkScratch {
  std::vector<Ioas::HostSegment> runs;
  std::vector<iovec> iov;
};

struct BlkCompletion {
  uint32_t used_len = 0;
  uint8_t status = 0;
  std::string problem;  // why the request failed, empty if it did not
};

Result<BlkCompletion> execute_blk_request(const BlkImage& image, const AddressSpace& space,
                                          const DescChain& chain, bool retry_on_miss,
                                          BlkScratch& scratch);

}  // namespace iomm::vhost
