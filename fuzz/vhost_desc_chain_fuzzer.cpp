// libFuzzer target: descriptor-chain parsing and virtio-blk request
// execution of the vhost-user-blk back end (src/vhost/desc_chain.*,
// blk_request.*).
//
// Input: byte 0 = log2 of the queue size (mod 9: 1..256 descriptors),
// byte 1 = flags (bit 0 indirect allowed, bit 1 read-only image),
// bytes 2-3 = head, then the descriptor table (16 bytes per descriptor),
// then the bytes of guest memory (64 KiB at GPA 0x10000; short inputs are
// zero-filled). Addresses outside that window are outside guest memory.
//
// Checks: no crash or sanitizer report; a parsed chain visits at most the
// queue (or indirect table) size, lists device-readable buffers before
// device-writable ones, and its totals add up; a request never reports
// more bytes written than the chain's writable bytes, its status is one of
// OK/IOERR/UNSUPP, and a read-only image never changes.
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include "fuzz_common.hpp"
#include "vhost/blk_image.hpp"
#include "vhost/blk_request.hpp"
#include "vhost/desc_chain.hpp"
#include "vhost/memory_table.hpp"

using namespace iomm;
using namespace iomm::vhost;

namespace {

constexpr uint64_t kGuestGpa = 0x10000;
constexpr uint64_t kGuestSize = 64 * 1024;
constexpr uint64_t kImageSize = 64 * 1024;

struct ArrayRing {
  VringLayout l;
  const std::vector<VringDesc>* table;
  [[nodiscard]] const VringLayout& layout() const { return l; }
  Result<VringDesc> desc(uint16_t i) const {
    if (i >= l.size) return Error(EINVAL, "index");
    return (*table)[i];
  }
};

struct Fixture {
  UniqueFd guest{::memfd_create("guest", MFD_CLOEXEC)};
  UniqueFd image_rw{::memfd_create("image", MFD_CLOEXEC)};
  std::optional<MemoryTable> table;
  std::optional<BlkImage> image;
  std::optional<BlkImage> image_ro;
  uint8_t* guest_map = nullptr;

  Fixture() {
    FUZZ_CHECK(::ftruncate(guest.get(), kGuestSize) == 0, "ftruncate");
    FUZZ_CHECK(::ftruncate(image_rw.get(), kImageSize) == 0, "ftruncate");
    guest_map = static_cast<uint8_t*>(
        ::mmap(nullptr, kGuestSize, PROT_READ | PROT_WRITE, MAP_SHARED, guest.get(), 0));
    FUZZ_CHECK(guest_map != MAP_FAILED, "mmap");
    std::vector<UniqueFd> fds;
    fds.emplace_back(::dup(guest.get()));
    const MemRegion r{kGuestGpa, kGuestSize, 0x7f0000000000, 0};
    auto t = MemoryTable::create(std::span(&r, 1), std::move(fds));
    FUZZ_CHECK(t.ok(), "memory table: %s", t.ok() ? "" : t.error().describe().c_str());
    table.emplace(std::move(*t));
    const std::string path = "/proc/self/fd/" + std::to_string(image_rw.get());
    auto rw = BlkImage::open(path, false);
    auto ro = BlkImage::open(path, true);
    FUZZ_CHECK(rw.ok() && ro.ok(), "image");
    image.emplace(std::move(*rw));
    image_ro.emplace(std::move(*ro));
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Fixture fx;
  fuzz::Reader in(data, size);
  const uint16_t qsize = static_cast<uint16_t>(1U << (in.u8() % 9));
  const uint8_t flags = in.u8();
  const uint16_t head = in.u16();
  std::vector<VringDesc> descs(qsize);
  in.bytes(descs.data(), descs.size() * sizeof(VringDesc));
  in.bytes(fx.guest_map, kGuestSize);

  ArrayRing ring{VringLayout{0, 0, 0, qsize, false}, &descs};
  DescChain chain;
  const AddressSpace& space = fx.table->gpa_space();
  const Status s = read_chain(ring, space, head, (flags & 1) != 0, chain);
  if (!s) {
    FUZZ_CHECK_ERRNO(s, "read_chain", EINVAL, ENOENT, EFAULT, EPERM, EOVERFLOW);
    return 0;
  }
  FUZZ_CHECK(chain.segments.size() <= 32768U, "chain of %zu segments", chain.segments.size());
  uint64_t readable = 0, writable = 0;
  bool seen_writable = false;
  for (const BufferSegment& seg : chain.segments) {
    if (seg.device_writable) {
      seen_writable = true;
      writable += seg.len;
    } else {
      FUZZ_CHECK(!seen_writable, "readable buffer after a writable one");
      readable += seg.len;
    }
  }
  FUZZ_CHECK(readable == chain.readable_bytes && writable == chain.writable_bytes, "totals");

  const BlkImage& image = (flags & 2) != 0 ? *fx.image_ro : *fx.image;
  std::vector<uint8_t> before(kImageSize);
  FUZZ_CHECK(::pread(image.fd(), before.data(), kImageSize, 0) == kImageSize, "pread");
  BlkScratch scratch;
  auto done = execute_blk_request(image, space, chain, false, scratch);
  FUZZ_CHECK(done.ok(), "execute without retry failed: %s",
             done.ok() ? "" : done.error().describe().c_str());
  FUZZ_CHECK(done->used_len <= chain.writable_bytes, "used %u > writable %llu", done->used_len,
             static_cast<unsigned long long>(chain.writable_bytes));
  FUZZ_CHECK(done->status == kBlkSOk || done->status == kBlkSIoerr || done->status == kBlkSUnsupp,
             "status %u", done->status);
  if ((flags & 2) != 0) {
    std::vector<uint8_t> after(kImageSize);
    FUZZ_CHECK(::pread(image.fd(), after.data(), kImageSize, 0) == kImageSize, "pread");
    FUZZ_CHECK(after == before, "a read-only image changed");
  }
  return 0;
}
