#include "vhost/blk_request.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "vhost/protocol.hpp"

namespace iomm::vhost {

namespace {

// Copies between buf and the chain's bytes [offset, offset + n) of one
// direction (device-readable or device-writable), in chain order.
Status copy_segments(const AddressSpace& space, const DescChain& chain, bool writable,
                     uint64_t offset, uint8_t* buf, uint64_t n, bool to_guest) {
  for (const BufferSegment& s : chain.segments) {
    if (n == 0) break;
    if (s.device_writable != writable) continue;
    if (offset >= s.len) {
      offset -= s.len;
      continue;
    }
    const uint64_t take = std::min<uint64_t>(n, s.len - offset);
    const Status st =
        to_guest ? space.write(s.addr + offset, buf, take) : space.read(s.addr + offset, buf, take);
    if (!st) return st;
    buf += take;
    n -= take;
    offset = 0;
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
                    bool retry_on_miss, std::vector<uint8_t>& bounce) {
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
      bounce.resize(in_bytes);
      uint64_t done = 0;
      while (done < in_bytes) {
        const ssize_t n = ::pread(image.fd(), bounce.data() + done, in_bytes - done,
                                  static_cast<off_t>(hdr.sector * kSectorSize + done));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return fail(std::string("pread: ") + std::strerror(errno));
        if (n == 0) return fail("pread: the image ended early (shrunk?)");
        done += static_cast<uint64_t>(n);
      }
      if (Status s = copy_segments(space, chain, true, 0, bounce.data(), in_bytes, true); !s)
        return guest_error(s, retry_on_miss, "writing read data to guest memory");
      return Outcome{kBlkSOk, in_bytes, {}};
    }
    case kBlkTOut: {
      if (image.read_only()) return fail("write to a read-only image");
      const uint64_t out_bytes = chain.readable_bytes - sizeof(hdr);
      if (Status s = check_range(image, hdr.sector, out_bytes); !s)
        return fail("write: " + s.error().message());
      bounce.resize(out_bytes);
      if (Status s =
              copy_segments(space, chain, false, sizeof(hdr), bounce.data(), out_bytes, false);
          !s)
        return guest_error(s, retry_on_miss, "reading write data from guest memory");
      uint64_t done = 0;
      while (done < out_bytes) {
        const ssize_t n = ::pwrite(image.fd(), bounce.data() + done, out_bytes - done,
                                   static_cast<off_t>(hdr.sector * kSectorSize + done));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return fail(std::string("pwrite: ") + std::strerror(n < 0 ? errno : EIO));
        done += static_cast<uint64_t>(n);
      }
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
                                          std::vector<uint8_t>& bounce) {
  if (chain.writable_bytes == 0)
    return BlkCompletion{0, kBlkSIoerr, "request without a writable status byte"};
  auto outcome = run(image, space, chain, retry_on_miss, bounce);
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
