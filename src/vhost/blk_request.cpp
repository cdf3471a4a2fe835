#include "vhost/blk_request.hpp"

#include <limits.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <new>

#include "vhost/protocol.hpp"

namespace iomm::vhost {

namespace {

// Calls visit(addr, n) for each piece of the chain's bytes [offset,
// offset + n) of one direction (device-readable or device-writable), in
// chain order, and stops at the first error.
template <typename Visit>
Status for_each_piece(const DescChain& chain, bool writable, uint64_t offset, uint64_t n,
                      Visit&& visit) {
  for (const BufferSegment& s : chain.segments) {
    if (n == 0) break;
    if (s.device_writable != writable) continue;
    if (offset >= s.len) {
      offset -= s.len;
      continue;
    }
    const uint64_t take = std::min<uint64_t>(n, s.len - offset);
    if (Status st = visit(s.addr + offset, take); !st) return st;
    n -= take;
    offset = 0;
  }
  return {};
}

// Copies between buf and the chain's bytes [offset, offset + n) of one
// direction.
Status copy_segments(const AddressSpace& space, const DescChain& chain, bool writable,
                     uint64_t offset, uint8_t* buf, uint64_t n, bool to_guest) {
  return for_each_piece(chain, writable, offset, n, [&](uint64_t addr, uint64_t take) {
    const Status st = to_guest ? space.write(addr, buf, take) : space.read(addr, buf, take);
    buf += take;
    return st;
  });
}

// The host runs of the chain's bytes [offset, offset + n) of one direction,
// as iovecs in scratch.iov; nothing is touched.
Status gather(const AddressSpace& space, const DescChain& chain, bool writable, uint64_t offset,
              uint64_t n, BlkScratch& scratch) {
  scratch.runs.clear();
  scratch.iov.clear();
  if (Status st = for_each_piece(chain, writable, offset, n,
                                 [&](uint64_t addr, uint64_t take) {
                                   return space.segments(addr, take, writable, scratch.runs);
                                 });
      !st)
    return st;
  try {
    for (const Ioas::HostSegment& r : scratch.runs)
      scratch.iov.push_back(iovec{r.host, static_cast<size_t>(r.length)});
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory");
  }
  return {};
}

// preadv/pwritev of `total` bytes at `pos` of the image between it and
// scratch.iov, resuming after short counts. A page of guest memory that is
// gone (a truncated memory file) fails the call with EFAULT: the kernel
// does not raise SIGBUS for its own accesses.
Status image_io(int fd, BlkScratch& scratch, uint64_t pos, uint64_t total, bool to_guest) {
  size_t first = 0;
  while (total > 0) {
    const int count = static_cast<int>(std::min<size_t>(scratch.iov.size() - first, IOV_MAX));
    const iovec& one = scratch.iov[first];
    const auto at = static_cast<off_t>(pos);
    // One run (the common case) skips the kernel's copy of the iovec array.
    ssize_t n = 0;
    if (count == 1)
      n = to_guest ? ::pread(fd, one.iov_base, one.iov_len, at)
                   : ::pwrite(fd, one.iov_base, one.iov_len, at);
    else
      n = to_guest ? ::preadv(fd, &one, count, at) : ::pwritev(fd, &one, count, at);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      return Error(err, std::string(to_guest ? "preadv" : "pwritev") + ": " + std::strerror(err) +
                            (err == EFAULT ? " (guest memory gone: a memory file shrank?)" : ""));
    }
    if (n == 0)
      return Error(EIO, to_guest ? "preadv: the image ended early (shrunk?)"
                                 : "pwritev: the image took no more bytes");
    auto left = static_cast<uint64_t>(n);
    total -= left;
    pos += left;
    while (left > 0 && left >= scratch.iov[first].iov_len) left -= scratch.iov[first++].iov_len;
    if (left > 0) {
      scratch.iov[first].iov_base = static_cast<uint8_t*>(scratch.iov[first].iov_base) + left;
      scratch.iov[first].iov_len -= left;
    }
  }
  return {};
}

struct Outcome {
  uint8_t status = kBlkSOk;
  uint64_t data_written = 0;  // bytes of device-writable data before the status
  std::string problem;
};

Outcome fail(std::string why) { return Outcome{kBlkSIoerr, 0, std::move(why)}; }

// A guest-memory error: a miss to retry, or the request's failure.
Result<Outcome> guest_error(const Status& s, bool retry_on_miss, const char* what) {
  if (s.code() == ENOENT && retry_on_miss) return s.error();
  return fail(std::string(what) + ": " + s.error().describe());
}

Status check_range(const BlkImage& image, uint64_t sector, uint64_t bytes) {
  if (bytes % kSectorSize != 0)
    return Error(EINVAL, std::to_string(bytes) + " data bytes, not a multiple of 512");
  if (bytes > kMaxBlkRequestBytes)
    return Error(EINVAL, std::to_string(bytes) + " data bytes, more than the device takes");
  if (sector > image.sectors() || bytes / kSectorSize > image.sectors() - sector)
    return Error(EINVAL, "sectors " + std::to_string(sector) + "+" +
                             std::to_string(bytes / kSectorSize) + " past the end of the image");
  return {};
}

Result<Outcome> run(const BlkImage& image, const AddressSpace& space, const DescChain& chain,
                    bool retry_on_miss, BlkScratch& scratch) {
  BlkOutHdr hdr;
  if (chain.readable_bytes < sizeof(hdr)) return fail("request without a 16-byte header");
  if (Status s = copy_segments(space, chain, false, 0, reinterpret_cast<uint8_t*>(&hdr),
                               sizeof(hdr), false);
      !s)
    return guest_error(s, retry_on_miss, "reading the request header");
  const uint64_t in_bytes = chain.writable_bytes - 1;  // before the status byte
  switch (hdr.type) {
    case kBlkTIn: {
      if (Status s = check_range(image, hdr.sector, in_bytes); !s)
        return fail("read: " + s.error().message());
      if (Status s = gather(space, chain, true, 0, in_bytes, scratch); !s)
        return guest_error(s, retry_on_miss, "the read buffers");
      if (Status s = image_io(image.fd(), scratch, hdr.sector * kSectorSize, in_bytes, true); !s)
        return fail("read: " + s.error().message());
      return Outcome{kBlkSOk, in_bytes, {}};
    }
    case kBlkTOut: {
      if (image.read_only()) return fail("write to a read-only image");
      const uint64_t out_bytes = chain.readable_bytes - sizeof(hdr);
      if (Status s = check_range(image, hdr.sector, out_bytes); !s)
        return fail("write: " + s.error().message());
      if (Status s = gather(space, chain, false, sizeof(hdr), out_bytes, scratch); !s)
        return guest_error(s, retry_on_miss, "the write buffers");
      if (Status s = image_io(image.fd(), scratch, hdr.sector * kSectorSize, out_bytes, false); !s)
        return fail("write: " + s.error().message());
      return Outcome{};
    }
    case kBlkTFlush: {
      if (Status s = image.flush(); !s) return fail("flush: " + s.error().message());
      return Outcome{};
    }
    case kBlkTGetId: {
      const uint64_t n = std::min<uint64_t>(in_bytes, kBlkIdBytes);
      uint8_t id[kBlkIdBytes] = {};
      std::memcpy(id, image.serial().data(), std::min<size_t>(image.serial().size(), n));
      if (Status s = copy_segments(space, chain, true, 0, id, n, true); !s)
        return guest_error(s, retry_on_miss, "writing the device id");
      return Outcome{kBlkSOk, n, {}};
    }
    default:
      return Outcome{kBlkSUnsupp, 0, "request type " + std::to_string(hdr.type) + " unsupported"};
  }
}

}  // namespace

Result<BlkCompletion> execute_blk_request(const BlkImage& image, const AddressSpace& space,
                                          const DescChain& chain, bool retry_on_miss,
                                          BlkScratch& scratch) {
  if (chain.writable_bytes == 0)
    return BlkCompletion{0, kBlkSIoerr, "request without a writable status byte"};
  auto outcome = run(image, space, chain, retry_on_miss, scratch);
  if (!outcome) return std::move(outcome).error();
  uint8_t status = outcome->status;
  if (Status s = copy_segments(space, chain, true, chain.writable_bytes - 1, &status, 1, true);
      !s) {
    if (s.code() == ENOENT && retry_on_miss) return s.error();
    return BlkCompletion{0, outcome->status,
                         "the status byte cannot be written: " + s.error().describe()};
  }
  return BlkCompletion{static_cast<uint32_t>(outcome->data_written + 1), outcome->status,
                       std::move(outcome->problem)};
}

}  // namespace iomm::vhost
