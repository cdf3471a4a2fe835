// libFuzzer target: the vhost-user-blk back end's message handler
// (src/vhost/blk_backend.*), and through it the memory table, the IOTLB
// and queue processing.
//
// Input: a sequence of steps, each an opcode byte:
//   0x00-0x7f  a message: request = a table entry (opcode % entries, the
//              last entry an arbitrary u32 from the input), then a flags
//              byte (bit 0 NEED_REPLY, bits 1-2 the number of fds, bit 3 a
//              bad version), a length byte and that many payload bytes.
//              fds come from a pool: the guest memfd, eventfds, the
//              back-end channel's peer.
//   0x80-0xbf  the canned QEMU-like setup (features from the next 8 bytes
//              masked to what is offered, the memory table of the 256 KiB
//              guest memfd at GPA 0x100000, queue 0 with rings at fixed
//              addresses, size from the next byte).
//   0xc0-0xff  write the next byte-count bytes into guest memory at the
//              offset given by the next u16 * 16, then re-enable queue 0
//              (which processes it).
// A handler error ends the input (the connection would be closed).
//
// Checks: no crash or sanitizer report; every error is EPROTO or an errno
// the components list; replies are well-formed; after the back end is
// destroyed nothing is pinned or charged.
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include "fuzz_common.hpp"
#include "iomm/accounting.hpp"
#include "vhost/blk_backend.hpp"
#include "vhost/blk_image.hpp"
#include "vhost/message.hpp"

using namespace iomm;
using namespace iomm::vhost;

namespace {

constexpr uint64_t kGuestGpa = 0x100000;
constexpr uint64_t kGuestSize = 256 * 1024;
constexpr uint64_t kGuestUaddr = 0x7f0000000000;
constexpr uint64_t kImageSize = 64 * 1024;

constexpr Request kRequests[] = {
    Request::get_features,
    Request::set_features,
    Request::set_owner,
    Request::reset_owner,
    Request::set_mem_table,
    Request::set_log_base,
    Request::set_vring_num,
    Request::set_vring_addr,
    Request::set_vring_base,
    Request::get_vring_base,
    Request::set_vring_kick,
    Request::set_vring_call,
    Request::set_vring_err,
    Request::get_protocol_features,
    Request::set_protocol_features,
    Request::get_queue_num,
    Request::set_vring_enable,
    Request::set_backend_req_fd,
    Request::iotlb_msg,
    Request::get_config,
    Request::set_config,
};
constexpr size_t kEntries = sizeof(kRequests) / sizeof(kRequests[0]) + 1;

struct Fixture {
  UniqueFd guest{::memfd_create("guest", MFD_CLOEXEC)};
  UniqueFd image_fd{::memfd_create("image", MFD_CLOEXEC)};
  std::optional<BlkImage> image;
  uint8_t* guest_map = nullptr;
  Fixture() {
    FUZZ_CHECK(::ftruncate(guest.get(), kGuestSize) == 0, "ftruncate");
    FUZZ_CHECK(::ftruncate(image_fd.get(), kImageSize) == 0, "ftruncate");
    guest_map = static_cast<uint8_t*>(
        ::mmap(nullptr, kGuestSize, PROT_READ | PROT_WRITE, MAP_SHARED, guest.get(), 0));
    FUZZ_CHECK(guest_map != MAP_FAILED, "mmap");
    auto img = BlkImage::open("/proc/self/fd/" + std::to_string(image_fd.get()), false);
    FUZZ_CHECK(img.ok(), "image");
    image.emplace(std::move(*img));
  }
};

void drain(int fd) {
  uint8_t buf[4096];
  while (::recv(fd, buf, sizeof(buf), MSG_DONTWAIT) > 0) {
  }
}

Message make(Request r, std::vector<uint8_t> payload, std::vector<UniqueFd> fds = {},
             uint32_t flags = kFlagVersion | kFlagNeedReply) {
  Message m;
  m.header = MsgHeader{static_cast<uint32_t>(r), flags, static_cast<uint32_t>(payload.size())};
  m.payload = std::move(payload);
  m.fds = std::move(fds);
  return m;
}

template <typename T>
std::vector<uint8_t> bytes_of(const T& v) {
  std::vector<uint8_t> b(sizeof(T));
  std::memcpy(b.data(), &v, sizeof(T));
  return b;
}

UniqueFd dup_fd(int fd) { return UniqueFd(::fcntl(fd, F_DUPFD_CLOEXEC, 0)); }

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Fixture fx;
  std::memset(fx.guest_map, 0, kGuestSize);
  fuzz::Reader in(data, size);
  int sv[2], ch[2];
  FUZZ_CHECK(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair");
  FUZZ_CHECK(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, ch) == 0, "socketpair");
  UniqueFd peer(sv[1]), chan_ours(ch[0]), chan_theirs(ch[1]);
  UniqueFd event(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  {
    BlkBackendOptions options;
    options.num_queues = 2;
    options.queue_size = 64;
    options.log = [](const std::string&) {};
    BlkBackend backend(*fx.image, options, UniqueFd(sv[0]));
    auto fd_from_pool = [&](uint8_t pick) {
      switch (pick % 3) {
        case 0:
          return dup_fd(fx.guest.get());
        case 1:
          return dup_fd(event.get());
        default:
          return dup_fd(chan_theirs.get());
      }
    };
    for (int step = 0; step < 64 && !in.empty(); ++step) {
      fuzz::g_step_index = step;
      const uint8_t op = in.u8();
      Status s;
      if (op < 0x80) {
        const size_t entry = op % kEntries;
        const uint32_t req =
            entry < kEntries - 1 ? static_cast<uint32_t>(kRequests[entry]) : in.u32();
        const uint8_t flags = in.u8();
        std::vector<uint8_t> payload(in.u8());
        in.bytes(payload.data(), payload.size());
        std::vector<UniqueFd> fds;
        for (int i = 0; i < ((flags >> 1) & 3); ++i) fds.push_back(fd_from_pool(in.u8()));
        Message m = make(static_cast<Request>(req), std::move(payload), std::move(fds),
                         kFlagVersion | ((flags & 1) != 0 ? kFlagNeedReply : 0));
        fuzz::g_step_name = request_name(req);
        s = backend.handle(m);
      } else if (op < 0xc0) {
        fuzz::g_step_name = "setup";
        const uint64_t features = in.u64() & backend.offered_features();
        const uint16_t qsize = static_cast<uint16_t>(1U << (in.u8() % 7));
        std::vector<Message> msgs;
        msgs.push_back(make(Request::set_protocol_features,
                            bytes_of(BlkBackend::offered_protocol_features())));
        {
          std::vector<UniqueFd> fds;
          fds.push_back(dup_fd(chan_theirs.get()));
          msgs.push_back(make(Request::set_backend_req_fd, {}, std::move(fds)));
        }
        msgs.push_back(make(Request::set_features, bytes_of(features)));
        {
          std::vector<uint8_t> p(sizeof(MemTableHeader) + sizeof(MemRegion));
          const MemTableHeader h{1, 0};
          const MemRegion r{kGuestGpa, kGuestSize, kGuestUaddr, 0};
          std::memcpy(p.data(), &h, sizeof(h));
          std::memcpy(p.data() + sizeof(h), &r, sizeof(r));
          std::vector<UniqueFd> fds;
          fds.push_back(dup_fd(fx.guest.get()));
          msgs.push_back(make(Request::set_mem_table, std::move(p), std::move(fds)));
        }
        const bool iotlb = (features & bit(kFAccessPlatform)) != 0;
        const uint64_t base = iotlb ? kGuestGpa : kGuestUaddr;
        msgs.push_back(make(Request::set_vring_num, bytes_of(VringState{0, qsize})));
        msgs.push_back(make(Request::set_vring_base, bytes_of(VringState{0, 0})));
        msgs.push_back(make(Request::set_vring_addr,
                            bytes_of(VringAddr{0, 0, base, base + 0x2000, base + 0x1000, 0})));
        if (iotlb) {
          IotlbMsg u;
          u.iova = kGuestGpa;
          u.size = kGuestSize;
          u.uaddr = kGuestUaddr;
          u.perm = kAccessRw;
          u.type = kIotlbUpdate;
          msgs.push_back(make(Request::iotlb_msg, bytes_of(u)));
        }
        {
          std::vector<UniqueFd> fds;
          fds.push_back(dup_fd(event.get()));
          msgs.push_back(make(Request::set_vring_kick, bytes_of(uint64_t{0}), std::move(fds)));
        }
        for (Message& m : msgs) {
          s = backend.handle(m);
          if (!s) break;
        }
      } else {
        fuzz::g_step_name = "guest memory";
        const uint64_t offset = (uint64_t{in.u16()} * 16) % kGuestSize;
        const size_t n = std::min<size_t>(in.u8(), kGuestSize - offset);
        in.bytes(fx.guest_map + offset, n);
        Message m = make(Request::set_vring_enable, bytes_of(VringState{0, 1}));
        s = backend.handle(m);
      }
      drain(peer.get());
      drain(chan_ours.get());
      if (!s) {
        FUZZ_CHECK_ERRNO(s, "handle", EPROTO, EINVAL, ENOENT, EPIPE, ENOMEM, EAGAIN);
        break;
      }
    }
  }
  const Counters c = counters();
  FUZZ_CHECK(c.pinned_bytes == 0 && c.charged_bytes == 0, "pinned %llu charged %llu",
             static_cast<unsigned long long>(c.pinned_bytes),
             static_cast<unsigned long long>(c.charged_bytes));
  return 0;
}
