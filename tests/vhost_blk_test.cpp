// The vhost-user-blk back end (src/vhost) driven by the test front end
// (vhost_frontend.hpp) over a socketpair with shared memfd guest memory, in
// GPA mode and in IOTLB mode (VIRTIO_F_ACCESS_PLATFORM: every ring and
// buffer address is an IOVA the back end learns through misses).
#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <thread>

#include "iomm/accounting.hpp"
#include "vhost/blk_image.hpp"
#include "vhost/server.hpp"
#include "vhost_frontend.hpp"

namespace iomm::vhost {
namespace {

using test::BackendThread;
using test::Completion;
using test::Frontend;
using test::FrontendOptions;
using test::kGpaBase;
using test::kIovaBase;

constexpr uint64_t kImageBytes = 4ULL << 20;

uint8_t pattern(uint64_t offset) { return static_cast<uint8_t>((offset >> 9) * 31 + offset); }

// A raw image in a memfd, opened by the back end through /proc/self/fd.
struct Image {
  explicit Image(bool read_only = false) {
    fd = UniqueFd(::memfd_create("image", MFD_CLOEXEC));
    std::vector<uint8_t> data(kImageBytes);
    for (uint64_t i = 0; i < kImageBytes; ++i) data[i] = pattern(i);
    EXPECT_EQ(::pwrite(fd.get(), data.data(), data.size(), 0), static_cast<ssize_t>(data.size()));
    auto img = BlkImage::open("/proc/self/fd/" + std::to_string(fd.get()), read_only);
    EXPECT_TRUE(img.ok()) << img.error().describe();
    blk.emplace(std::move(*img));
  }
  std::vector<uint8_t> read(uint64_t offset, size_t n) const {
    std::vector<uint8_t> out(n);
    EXPECT_EQ(::pread(fd.get(), out.data(), n, static_cast<off_t>(offset)),
              static_cast<ssize_t>(n));
    return out;
  }
  UniqueFd fd;
  std::optional<BlkImage> blk;
};

// A back end on its own thread and a test front end connected to it and
// set up; finish() closes the front end and checks the back end saw it go.
struct Session {
  explicit Session(FrontendOptions o = {}, BlkBackendOptions b = {})
      : be(*image.blk, std::move(b)), fe(be.take_socket(), o) {
    fe.setup();
  }
  void finish() {
    fe.close();
    EXPECT_EQ(be.join().code(), ECONNRESET) << be.all_logs();
  }
  Image image;
  BackendThread be;
  Frontend fe;
};

class VhostBlk : public ::testing::TestWithParam<bool> {
 protected:
  void start(FrontendOptions o = {}, BlkBackendOptions b = {}, bool read_only = false) {
    o.iotlb = GetParam();
    image_ = std::make_unique<Image>(read_only);
    b.num_queues = std::max(b.num_queues, o.num_queues);
    be_ = std::make_unique<BackendThread>(*image_->blk, b);
    fe_ = std::make_unique<Frontend>(be_->take_socket(), o);
    fe_->setup();
  }
  void TearDown() override {
    fe_.reset();  // closes the socket: the back end sees the front end go
    if (be_) {
      const Status s = be_->join();
      EXPECT_EQ(s.code(), ECONNRESET) << be_->all_logs();
    }
    const Counters c = counters();
    EXPECT_EQ(c.pinned_bytes, 0U);
    EXPECT_EQ(c.charged_bytes, 0U);
  }
  // Reads `sectors` at `sector` into a fresh buffer; checks status and data.
  void read_and_check(uint64_t sector, uint32_t bytes, bool indirect = false) {
    const uint64_t buf = fe_->alloc(bytes, 512);
    const uint16_t head = fe_->submit(0, kBlkTIn, sector, buf, bytes, indirect);
    auto done = fe_->wait(0, 1);
    ASSERT_EQ(done[0].id, head);
    EXPECT_EQ(done[0].len, bytes + 1);
    EXPECT_EQ(fe_->status(0, head), kBlkSOk);
    EXPECT_EQ(0, std::memcmp(fe_->host(buf), image_->read(sector * 512, bytes).data(), bytes));
  }
  std::unique_ptr<Image> image_;
  std::unique_ptr<BackendThread> be_;
  std::unique_ptr<Frontend> fe_;
};

INSTANTIATE_TEST_SUITE_P(Modes, VhostBlk, ::testing::Values(false, true),
                         [](const auto& p) { return p.param ? "Iotlb" : "Gpa"; });

TEST_P(VhostBlk, ReadWriteFlushGetId) {
  start();
  read_and_check(3, 4096);
  read_and_check(1000, 512, /*indirect=*/true);

  const uint64_t buf = fe_->alloc(8192, 512);
  for (int i = 0; i < 8192; ++i) fe_->host(buf)[i] = static_cast<uint8_t>(i * 7 + 1);
  uint16_t head = fe_->submit(0, kBlkTOut, 100, buf, 8192);
  auto done = fe_->wait(0, 1);
  EXPECT_EQ(done[0].id, head);
  EXPECT_EQ(done[0].len, 1U);
  EXPECT_EQ(fe_->status(0, head), kBlkSOk);
  EXPECT_EQ(0, std::memcmp(image_->read(100 * 512, 8192).data(), fe_->host(buf), 8192));

  head = fe_->submit(0, kBlkTFlush, 0, 0, 0);
  done = fe_->wait(0, 1);
  EXPECT_EQ(done[0].len, 1U);
  EXPECT_EQ(fe_->status(0, head), kBlkSOk);

  const uint64_t id = fe_->alloc(kBlkIdBytes);
  head = fe_->submit(0, kBlkTGetId, 0, id, kBlkIdBytes, true);
  done = fe_->wait(0, 1);
  EXPECT_EQ(done[0].len, kBlkIdBytes + 1);
  EXPECT_EQ(fe_->status(0, head), kBlkSOk);
  const std::string serial = image_->blk->serial();
  EXPECT_EQ(std::string(reinterpret_cast<char*>(fe_->host(id)), serial.size()), serial);

  head = fe_->submit(0, 77, 0, 0, 0);  // an unknown type
  fe_->wait(0, 1);
  EXPECT_EQ(fe_->status(0, head), kBlkSUnsupp);
}

TEST_P(VhostBlk, BatchOfRandomReadsOnTwoQueues) {
  FrontendOptions o;
  o.num_queues = 2;
  start(o);
  std::mt19937 rng(7);
  for (uint16_t q = 0; q < 2; ++q) {
    std::vector<std::pair<uint16_t, std::pair<uint64_t, uint64_t>>> reqs;
    for (int i = 0; i < 16; ++i) {
      const uint64_t sector = (rng() % (kImageBytes / 4096)) * 8;
      const uint64_t buf = fe_->alloc(4096, 4096);
      reqs.push_back(
          {fe_->submit(q, kBlkTIn, sector, buf, 4096, i % 2 == 0, i == 15), {sector, buf}});
    }
    auto done = fe_->wait(q, 16);
    ASSERT_EQ(done.size(), 16U);
    for (const auto& [head, where] : reqs) {
      EXPECT_EQ(fe_->status(q, head), kBlkSOk);
      EXPECT_EQ(0, std::memcmp(fe_->host(where.second),
                               image_->read(where.first * 512, 4096).data(), 4096));
    }
  }
}

TEST_P(VhostBlk, GetVringBaseStopsTheRing) {
  start();
  read_and_check(0, 512);
  const uint16_t base = fe_->stop_queue(0);
  EXPECT_EQ(base, 1);
  const uint64_t buf = fe_->alloc(512, 512);
  const uint16_t head = fe_->submit(0, kBlkTIn, 5, buf, 512);
  // A round trip: the back end has handled everything sent before it.
  EXPECT_EQ(fe_->get_u64(Request::get_queue_num), 1U);
  EXPECT_EQ(fe_->used_idx(0), 1);
  // Restarted from the saved base, it serves the pending request once.
  fe_->request_ack(Request::set_vring_base, VringState{0, base});
  int kick[1];
  UniqueFd k(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  kick[0] = k.get();
  fe_->request_ack(Request::set_vring_kick, uint64_t{0}, true, kick);
  (void)!::eventfd_write(k.get(), 1);
  auto done = fe_->wait(0, 1);
  EXPECT_EQ(done[0].id, head);
  EXPECT_EQ(fe_->status(0, head), kBlkSOk);
  EXPECT_EQ(fe_->get_u64(Request::get_queue_num), 1U);
  EXPECT_EQ(fe_->used_idx(0), 2);
}

TEST_P(VhostBlk, EventIdxSuppressesNotifications) {
  FrontendOptions o;
  o.interrupt_wait = false;
  start(o);
  read_and_check(0, 512);
  (void)fe_->get_u64(Request::get_queue_num);
  const uint64_t before = fe_->calls(0);
  // used_event far ahead: no interrupt for the next completion.
  fe_->set_used_event(0, 100);
  read_and_check(1, 512);
  (void)fe_->get_u64(Request::get_queue_num);
  EXPECT_EQ(fe_->calls(0), before);
  // used_event at the current index: the next completion crosses it.
  fe_->set_used_event(0, fe_->used_idx(0));
  read_and_check(2, 512);
  (void)fe_->get_u64(Request::get_queue_num);
  EXPECT_EQ(fe_->calls(0), before + 1);
}

// A driver's poll queue (the benchmark's front end): used_event kept far
// ahead, the used ring polled, a kick only where the back end asked for one
// (avail_event). The back end never signals and never sleeps on work it
// has: a missed kick would leave poll_wait to time out.
TEST_P(VhostBlk, PolledQueueNeedsNoInterrupts) {
  start();
  fe_->set_used_event(0, 0x8000);
  int kicks = 0;
  for (uint64_t round = 0; round < 4; ++round) {
    std::vector<std::pair<uint64_t, uint64_t>> reads;  // sector, buffer
    const uint16_t before = fe_->avail_idx(0);
    for (uint64_t i = 0; i < 8; ++i) {
      const uint64_t sector = (round * 8 + i) * 8, buf = fe_->alloc(4096, 4096);
      fe_->submit(0, kBlkTIn, sector, buf, 4096, false, false);
      reads.emplace_back(sector, buf);
    }
    if (fe_->kick_if_needed(0, before)) ++kicks;
    for (const Completion& c : fe_->poll_wait(0, 8)) {
      EXPECT_EQ(c.len, 4097U);
      EXPECT_EQ(fe_->status(0, c.id), kBlkSOk);
    }
    for (const auto& [sector, buf] : reads)
      EXPECT_EQ(0, std::memcmp(fe_->host(buf), image_->read(sector * 512, 4096).data(), 4096));
  }
  // The ring starts empty with avail_event 0: the first batch is kicked.
  EXPECT_GE(kicks, 1);
  (void)fe_->get_u64(Request::get_queue_num);
  EXPECT_EQ(fe_->calls(0), 0U);
}

TEST_P(VhostBlk, WriteToReadOnlyImageFails) {
  start({}, {}, /*read_only=*/true);
  const uint64_t buf = fe_->alloc(512, 512);
  std::memset(fe_->host(buf), 0x5a, 512);
  const uint16_t head = fe_->submit(0, kBlkTOut, 0, buf, 512);
  auto done = fe_->wait(0, 1);
  EXPECT_EQ(done[0].len, 1U);
  EXPECT_EQ(fe_->status(0, head), kBlkSIoerr);
  EXPECT_EQ(image_->read(0, 1)[0], pattern(0));
  EXPECT_TRUE(be_->logged("write to a read-only image"));
}

TEST_P(VhostBlk, BadRequestsFailWithIoerr) {
  start();
  const uint64_t buf = fe_->alloc(4096, 512);
  // Data not a multiple of 512 bytes.
  uint16_t head = fe_->submit(0, kBlkTIn, 0, buf, 100);
  fe_->wait(0, 1);
  EXPECT_EQ(fe_->status(0, head), kBlkSIoerr);
  // Past the end of the image.
  head = fe_->submit(0, kBlkTIn, kImageBytes / 512 - 1, buf, 1024);
  fe_->wait(0, 1);
  EXPECT_EQ(fe_->status(0, head), kBlkSIoerr);
  head = fe_->submit(0, kBlkTOut, UINT64_MAX / 512, buf, 512);
  fe_->wait(0, 1);
  EXPECT_EQ(fe_->status(0, head), kBlkSIoerr);
  // The queue still works.
  read_and_check(4, 512);
}

// A buffer outside guest memory (GPA mode) fails the request; a write whose
// last buffer is outside writes nothing (it is never a partial write
// reported as done, nor a partial write at all).
TEST(VhostBlkBadInput, BuffersOutsideGuestMemory) {
  Session session;
  auto& [image, be, fe] = session;
  const uint16_t h = fe.take_desc(0), d = fe.take_desc(0), s = fe.take_desc(0);
  const uint64_t hdr = fe.alloc(16), st = fe.alloc(1);
  *reinterpret_cast<BlkOutHdr*>(fe.host(hdr)) = BlkOutHdr{kBlkTIn, 0, 0};
  *fe.desc(0, h) = VringDesc{hdr, 16, kVringDescFNext, d};
  *fe.desc(0, d) = VringDesc{0x1000, 512, kVringDescFNext | kVringDescFWrite, s};
  *fe.desc(0, s) = VringDesc{st, 1, kVringDescFWrite, 0};
  fe.publish(0, h);
  auto done = fe.wait(0, 1, std::chrono::seconds(2));
  EXPECT_EQ(done[0].len, 1U) << be.all_logs();
  EXPECT_EQ(*fe.host(st), kBlkSIoerr);

  // OUT: 512 bytes in guest memory, then 512 past its end.
  const uint16_t d2 = fe.take_desc(0);
  const uint64_t data = fe.alloc(512, 512);
  std::memset(fe.host(data), 0x77, 512);
  *reinterpret_cast<BlkOutHdr*>(fe.host(hdr)) = BlkOutHdr{kBlkTOut, 0, 0};
  *fe.desc(0, h) = VringDesc{hdr, 16, kVringDescFNext, d};
  *fe.desc(0, d) = VringDesc{data, 512, kVringDescFNext, d2};
  *fe.desc(0, d2) = VringDesc{kGpaBase + fe.options().mem_size - 256, 512, kVringDescFNext, s};
  *fe.desc(0, s) = VringDesc{st, 1, kVringDescFWrite, 0};
  fe.publish(0, h);
  done = fe.wait(0, 1);
  EXPECT_EQ(*fe.host(st), kBlkSIoerr);
  EXPECT_EQ(image.read(0, 1)[0], pattern(0));
  EXPECT_TRUE(be.logged("the write buffers")) << be.all_logs();
  session.finish();
}

// Malformed chains complete with used length 0 and the queue goes on.
TEST(VhostBlkBadInput, MalformedChains) {
  FrontendOptions o;
  o.queue_size = 16;
  Session session(o);
  auto& [image, be, fe] = session;
  const uint64_t hdr = fe.alloc(16), st = fe.alloc(1), table = fe.alloc(16 * 32, 16);
  *reinterpret_cast<BlkOutHdr*>(fe.host(hdr)) = BlkOutHdr{kBlkTIn, 0, 0};
  const uint16_t a = fe.take_desc(0), b = fe.take_desc(0);
  auto expect_refused = [&](const char* why) {
    fe.publish(0, a);
    auto done = fe.wait(0, 1);
    EXPECT_EQ(done[0].id, a) << why;
    EXPECT_EQ(done[0].len, 0U) << why;
  };
  // A loop.
  *fe.desc(0, a) = VringDesc{hdr, 16, kVringDescFNext, b};
  *fe.desc(0, b) = VringDesc{hdr, 16, kVringDescFNext, a};
  expect_refused("loop");
  EXPECT_TRUE(be.logged("longer than the queue"));
  // next out of range.
  *fe.desc(0, b) = VringDesc{st, 1, kVringDescFWrite | kVringDescFNext, 16};
  expect_refused("next out of range");
  // Readable after writable.
  *fe.desc(0, a) = VringDesc{st, 1, kVringDescFWrite | kVringDescFNext, b};
  *fe.desc(0, b) = VringDesc{hdr, 16, 0, 0};
  expect_refused("readable after writable");
  // An indirect table longer than the queue.
  *fe.desc(0, a) = VringDesc{table, 16 * 17, kVringDescFIndirect, 0};
  expect_refused("indirect longer than the queue");
  // An indirect length not a multiple of 16; indirect with NEXT.
  *fe.desc(0, a) = VringDesc{table, 24, kVringDescFIndirect, 0};
  expect_refused("indirect length");
  *fe.desc(0, a) = VringDesc{table, 32, kVringDescFIndirect | kVringDescFNext, b};
  expect_refused("indirect with next");
  // A loop inside an indirect table, and a nested indirect.
  auto* t = reinterpret_cast<VringDesc*>(fe.host(table));
  t[0] = VringDesc{hdr, 16, kVringDescFNext, 1};
  t[1] = VringDesc{st, 1, kVringDescFWrite | kVringDescFNext, 0};
  *fe.desc(0, a) = VringDesc{table, 32, kVringDescFIndirect, 0};
  expect_refused("indirect loop");
  t[1] = VringDesc{table, 16, kVringDescFIndirect, 0};
  expect_refused("nested indirect");
  // No writable byte for the status.
  *fe.desc(0, a) = VringDesc{hdr, 16, 0, 0};
  expect_refused("no status byte");
  EXPECT_TRUE(be.logged("without a writable status byte"));
  // The queue still serves a good request.
  const uint64_t buf = fe.alloc(512, 512);
  const uint16_t head = fe.submit(0, kBlkTIn, 1, buf, 512);
  fe.wait(0, 1);
  EXPECT_EQ(fe.status(0, head), kBlkSOk);
  session.finish();
}

// A ring the driver corrupts stops the queue (logged), not the back end.
TEST(VhostBlkBadInput, CorruptAvailRingBreaksOnlyTheQueue) {
  Session session;
  auto& [image, be, fe] = session;
  fe.avail_ring(0)[2] = 1000;  // head out of range
  fe.publish(0, 1000);
  EXPECT_EQ(fe.get_u64(Request::get_queue_num), 1U);
  // The back end may answer the message before it sees the kick: wait for
  // the kick's outcome (bounded), then check the back end still serves.
  for (int i = 0; i < 1000 && !be.logged("names descriptor 1000"); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_TRUE(be.logged("names descriptor 1000")) << be.all_logs();
  EXPECT_EQ(fe.get_u64(Request::get_queue_num), 1U);
  EXPECT_EQ(fe.used_idx(0), 0);
  session.finish();
}

// Each protocol violation closes the connection with a logged reason.
struct ProtocolCase {
  const char* name;
  std::function<void(Frontend&)> send;
  const char* reason;
};

class VhostBlkProtocol : public ::testing::TestWithParam<ProtocolCase> {};

TEST_P(VhostBlkProtocol, ClosesTheConnection) {
  Image image;
  BackendThread be(*image.blk, {});
  Frontend fe(be.take_socket(), {});
  GetParam().send(fe);
  const Status s = be.join();
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(be.logged(GetParam().reason)) << be.all_logs();
  EXPECT_TRUE(be.logged("closing the connection")) << be.all_logs();
}

std::vector<uint8_t> mem_table(std::initializer_list<MemRegion> regions) {
  std::vector<uint8_t> p(sizeof(MemTableHeader) + regions.size() * sizeof(MemRegion));
  MemTableHeader h{static_cast<uint32_t>(regions.size()), 0};
  std::memcpy(p.data(), &h, sizeof(h));
  size_t at = sizeof(h);
  for (const MemRegion& r : regions) {
    std::memcpy(p.data() + at, &r, sizeof(r));
    at += sizeof(r);
  }
  return p;
}

INSTANTIATE_TEST_SUITE_P(
    BadInput, VhostBlkProtocol,
    ::testing::Values(
        ProtocolCase{"WrongSize",
                     [](Frontend& fe) { fe.send_v(Request::set_features, uint32_t{1}); },
                     "payload of 4 bytes, expected 8"},
        ProtocolCase{"QueueIndexOutOfRange",
                     [](Frontend& fe) {
                       fe.send_v(Request::set_vring_num, VringState{9, 64});
                     },
                     "queue index 9 out of range"},
        ProtocolCase{"BadQueueSize",
                     [](Frontend& fe) {
                       fe.send_v(Request::set_vring_num, VringState{0, 100});
                     },
                     "queue size 100 is not a power of two"},
        ProtocolCase{
            "MissingMemoryFd",
            [](Frontend& fe) {
              fe.send(Request::set_mem_table, mem_table({{kGpaBase, 1 << 20, 0x10000000, 0}}));
            },
            "1 memory regions came with 0 fds"},
        ProtocolCase{"MissingKickFd",
                     [](Frontend& fe) { fe.send_v(Request::set_vring_kick, uint64_t{0}); },
                     "carries 0 fds, expected 1"},
        ProtocolCase{"ExtraFd",
                     [](Frontend& fe) {
                       const int fds[1] = {fe.memfd()};
                       fe.send(Request::get_features, {}, fds);
                     },
                     "carries 1 fds, expected 0"},
        ProtocolCase{"OverlappingRegions",
                     [](Frontend& fe) {
                       const int fds[2] = {fe.memfd(), fe.memfd()};
                       fe.send(Request::set_mem_table,
                               mem_table({{kGpaBase, 1 << 20, 0x10000000, 0},
                                          {kGpaBase + 4096, 4096, 0x20000000, 0}}),
                               fds);
                     },
                     "overlap in guest-physical space"},
        ProtocolCase{"WrappingRegion",
                     [](Frontend& fe) {
                       const int fds[1] = {fe.memfd()};
                       fe.send(Request::set_mem_table,
                               mem_table({{UINT64_MAX - 4095, 8192, 0x10000000, 0}}), fds);
                     },
                     "wraps the 64-bit address space"},
        ProtocolCase{"RegionPastTheFile",
                     [](Frontend& fe) {
                       const int fds[1] = {fe.memfd()};
                       fe.send(Request::set_mem_table,
                               mem_table({{kGpaBase, 1ULL << 30, 0x10000000, 0}}), fds);
                     },
                     "SET_MEM_TABLE: EINVAL"},
        ProtocolCase{"OversizedPayload",
                     [](Frontend& fe) {
                       std::vector<uint8_t> big(kMaxPayload + 1);
                       fe.send(Request::get_config, big);
                     },
                     "exceeds 4096"},
        ProtocolCase{"UnknownRequest", [](Frontend& fe) { fe.send(static_cast<Request>(99), {}); },
                     "is not supported"},
        ProtocolCase{"FeatureNotOffered",
                     [](Frontend& fe) { fe.send_v(Request::set_features, uint64_t{1} << 63); },
                     "were not offered"},
        ProtocolCase{"ConfigOutOfRange",
                     [](Frontend& fe) {
                       std::vector<uint8_t> p(sizeof(ConfigHeader) + 16);
                       ConfigHeader h{250, 16, 0};
                       std::memcpy(p.data(), &h, sizeof(h));
                       fe.send(Request::get_config, p);
                     },
                     "outside the configuration space"},
        ProtocolCase{"IotlbWithoutAccessPlatform",
                     [](Frontend& fe) { fe.send_v(Request::iotlb_msg, IotlbMsg{}); },
                     "ACCESS_PLATFORM was not negotiated"},
        ProtocolCase{"BadVersion",
                     [](Frontend& fe) { fe.send(Request::get_features, {}, {}, 0x2); },
                     "protocol version 1"}),
    [](const auto& p) { return std::string(p.param.name); });

// --- IOTLB mode -------------------------------------------------------------

FrontendOptions iotlb_options() {
  FrontendOptions o;
  o.iotlb = true;
  return o;
}

TEST(VhostBlkIotlb, RingsAndBuffersArriveThroughMisses) {
  // setup()'s SET_VRING_ADDR names IOVAs the IOTLB does not hold yet.
  Session session(iotlb_options());
  auto& [image, be, fe] = session;
  const uint64_t buf = fe.alloc(4096, 4096);
  const uint16_t head = fe.submit(0, kBlkTIn, 8, buf, 4096);
  fe.wait(0, 1);
  EXPECT_EQ(fe.status(0, head), kBlkSOk);
  EXPECT_EQ(0, std::memcmp(fe.host(buf), image.read(8 * 512, 4096).data(), 4096));
  EXPECT_GE(fe.misses(), 4U);  // avail, desc, header, data, status, used
  session.finish();
  EXPECT_EQ(be.stats().misses_sent, fe.misses());
  EXPECT_EQ(be.stats().iotlb_updates, fe.misses());
}

TEST(VhostBlkIotlb, InvalidationDuringIo) {
  Session session(iotlb_options());
  auto& [image, be, fe] = session;
  std::mt19937 rng(3);
  for (int round = 0; round < 4; ++round) {
    std::vector<std::tuple<uint16_t, uint64_t, uint64_t>> reqs;
    for (int i = 0; i < 12; ++i) {
      const uint64_t sector = (rng() % (kImageBytes / 4096)) * 8;
      const uint64_t buf = fe.alloc(4096, 4096);
      std::memset(fe.host(buf), 0, 4096);
      reqs.emplace_back(fe.submit(0, kBlkTIn, sector, buf, 4096), sector, buf);
      // Drop the whole IOTLB while requests are queued and being served.
      if (i % 4 == 3) fe.invalidate(0, UINT64_MAX);
    }
    fe.wait(0, 12);
    for (const auto& [head, sector, buf] : reqs) {
      EXPECT_EQ(fe.status(0, head), kBlkSOk);
      EXPECT_EQ(0, std::memcmp(fe.host(buf), image.read(sector * 512, 4096).data(), 4096));
    }
  }
  session.finish();
  EXPECT_GT(be.stats().iotlb_invalidations, 0U);
  // The INVALIDATEs reached the ring cache through its notifiers (an unmap
  // of the IOTLB's Ioas), and it cached the rings again after each.
  const QueueStats q = be.queue_stats().at(0);
  EXPECT_GE(q.ring.invalidations, 3U);
  EXPECT_GE(q.ring.revalidations, 4U);
  EXPECT_GT(q.ring.cached_batches, 0U);
}

// The rings go through the cache: plain pointers into memory sealed against
// shrinking (no translated copy at all in GPA mode), guarded copies only
// where the memory file may shrink.
TEST_P(VhostBlk, RingsThroughTheCache) {
  for (const bool seal : {true, false}) {
    FrontendOptions o;
    o.seal = seal;
    start(o);
    for (uint64_t s = 0; s < 8; ++s) read_and_check(s * 8, 4096);
    TearDown();
    const QueueStats q = be_->queue_stats().at(0);
    be_.reset();
    if (seal) {
      EXPECT_GT(q.ring.cached_batches, 0U);
      if (!GetParam()) {
        EXPECT_EQ(q.ring.uncached_batches, 0U);
        EXPECT_EQ(q.ring.slow_accesses, 0U);
      }
    } else {
      EXPECT_EQ(q.ring.cached_batches, 0U);
      EXPECT_GT(q.ring.uncached_batches, 0U);
      EXPECT_GT(q.ring.slow_accesses, 0U);
    }
  }
}

// An INVALIDATE of only the rings' pages while requests are queued: the
// cache drops its pointers, the queue misses on the rings and goes on once
// they are back.
TEST(VhostBlkIotlb, RingInvalidationBetweenRequests) {
  Session session(iotlb_options());
  auto& [image, be, fe] = session;
  const uint64_t buf = fe.alloc(4096, 4096);
  uint16_t head = fe.submit(0, kBlkTIn, 8, buf, 4096);
  fe.wait(0, 1);
  ASSERT_EQ(fe.status(0, head), kBlkSOk);
  const uint64_t misses = fe.misses();
  // The first three pages of guest memory hold queue 0's rings.
  fe.invalidate(kIovaBase, 3 * 4096);
  head = fe.submit(0, kBlkTIn, 16, buf, 4096);
  fe.wait(0, 1);
  EXPECT_EQ(fe.status(0, head), kBlkSOk);
  EXPECT_EQ(0, std::memcmp(fe.host(buf), image.read(16 * 512, 4096).data(), 4096));
  EXPECT_GE(fe.misses(), misses + 3);  // desc, avail and used again
  session.finish();
  const QueueStats q = be.queue_stats().at(0);
  EXPECT_GE(q.ring.invalidations, 1U);
  EXPECT_GE(q.ring.revalidations, 2U);
}

// --- data buffers moved by preadv/pwritev into and out of guest memory ------

// A buffer whose IOVA pages map to guest pages in reverse order: two host
// runs, each gets its own part of the image.
TEST(VhostBlkDirect, BufferOverNonContiguousRuns) {
  Session session(iotlb_options());
  auto& [image, be, fe] = session;
  const uint64_t buf = fe.alloc(8192, 4096);
  ASSERT_EQ(fe.update(fe.dev(buf), 4096, fe.uaddr(buf + 4096), kAccessRw), 0U);
  ASSERT_EQ(fe.update(fe.dev(buf) + 4096, 4096, fe.uaddr(buf), kAccessRw), 0U);
  uint16_t head = fe.submit(0, kBlkTIn, 24, buf, 8192);
  fe.wait(0, 1);
  ASSERT_EQ(fe.status(0, head), kBlkSOk);
  EXPECT_EQ(0, std::memcmp(fe.host(buf + 4096), image.read(24 * 512, 4096).data(), 4096));
  EXPECT_EQ(0, std::memcmp(fe.host(buf), image.read(24 * 512 + 4096, 4096).data(), 4096));
  // And back out: the image gets the two runs in IOVA order.
  std::memset(fe.host(buf), 0xa1, 4096);
  std::memset(fe.host(buf + 4096), 0xb2, 4096);
  head = fe.submit(0, kBlkTOut, 40, buf, 8192);
  fe.wait(0, 1);
  ASSERT_EQ(fe.status(0, head), kBlkSOk);
  EXPECT_EQ(image.read(40 * 512, 4096), std::vector<uint8_t>(4096, 0xb2));
  EXPECT_EQ(image.read(40 * 512 + 4096, 4096), std::vector<uint8_t>(4096, 0xa1));
  session.finish();
}

// A read whose buffer runs past the end of guest memory fails before any
// byte moves: the part inside guest memory keeps its contents.
TEST(VhostBlkDirect, ReadBufferPastGuestMemoryMovesNothing) {
  Session session;
  auto& [image, be, fe] = session;
  const uint64_t last_page = kGpaBase + fe.options().mem_size - 4096;
  std::memset(fe.host(last_page), 0x5c, 4096);
  const uint16_t head = fe.submit(0, kBlkTIn, 0, last_page, 8192);
  auto done = fe.wait(0, 1);
  EXPECT_EQ(fe.status(0, head), kBlkSIoerr);
  EXPECT_EQ(done[0].len, 1U);
  EXPECT_EQ(std::vector<uint8_t>(fe.host(last_page), fe.host(last_page) + 4096),
            std::vector<uint8_t>(4096, 0x5c));
  EXPECT_TRUE(be.logged("the read buffers")) << be.all_logs();
  session.finish();
}

// --- guest memory that shrinks ----------------------------------------------

// The guest memory file (not sealed) loses the pages of a buffer: the
// kernel fails the preadv/pwritev with EFAULT (no SIGBUS), the request
// completes with IOERR, the image is untouched, and once the file grows
// back the same request succeeds.
TEST_P(VhostBlk, ShrunkGuestMemoryFailsTheRequest) {
  FrontendOptions o;
  o.seal = false;
  start(o);
  const uint64_t half = fe_->options().mem_size / 2;
  fe_->alloc(half - (fe_->alloc(0) - kGpaBase));  // buffers in the upper half
  const uint64_t buf = fe_->alloc(65536, 4096);
  ASSERT_EQ(::ftruncate(fe_->memfd(), static_cast<off_t>(half)), 0);
  uint16_t head = fe_->submit(0, kBlkTIn, 0, buf, 65536);
  auto done = fe_->wait(0, 1);
  EXPECT_EQ(fe_->status(0, head), kBlkSIoerr);
  EXPECT_EQ(done[0].len, 1U);
  head = fe_->submit(0, kBlkTOut, 0, buf, 65536);
  fe_->wait(0, 1);
  EXPECT_EQ(fe_->status(0, head), kBlkSIoerr);
  const std::vector<uint8_t> image_now = image_->read(0, 65536);
  for (uint64_t i = 0; i < image_now.size(); ++i) ASSERT_EQ(image_now[i], pattern(i)) << i;
  EXPECT_TRUE(be_->logged("guest memory gone")) << be_->all_logs();
  ASSERT_EQ(::ftruncate(fe_->memfd(), static_cast<off_t>(fe_->options().mem_size)), 0);
  read_and_check(0, 65536);

  // The same while another thread cuts and restores the buffer's pages
  // during the I/O: every request completes, OK or IOERR, and the back end
  // goes on.
  std::atomic<bool> stop{false};
  std::thread cutter([&] {
    while (!stop.load()) {
      EXPECT_EQ(::ftruncate(fe_->memfd(), static_cast<off_t>(half)), 0);
      EXPECT_EQ(::ftruncate(fe_->memfd(), static_cast<off_t>(fe_->options().mem_size)), 0);
    }
  });
  int completed = 0;
  for (int i = 0; i < 48; ++i) {
    head = fe_->submit(0, i % 3 == 2 ? kBlkTOut : kBlkTIn, 128ULL * i, buf, 65536);
    fe_->wait(0, 1);
    const uint8_t st = fe_->status(0, head);
    EXPECT_TRUE(st == kBlkSOk || st == kBlkSIoerr) << int(st);
    ++completed;
  }
  stop.store(true);
  cutter.join();
  EXPECT_EQ(completed, 48);
  read_and_check(4096, 65536);
}

// After the guest unmaps a buffer and the front end invalidates it, the
// back end cannot reach it: the miss goes unanswered and the request fails
// once the wait runs out; the page keeps its old contents.
TEST(VhostBlkIotlb, UnmappedBufferIsNeverTouched) {
  BlkBackendOptions b;
  b.miss_timeout = std::chrono::milliseconds(50);
  Session session(iotlb_options(), b);
  auto& [image, be, fe] = session;
  const uint64_t buf = fe.alloc(4096, 4096);
  uint16_t head = fe.submit(0, kBlkTIn, 0, buf, 4096);
  fe.wait(0, 1);
  ASSERT_EQ(fe.status(0, head), kBlkSOk);
  const std::vector<uint8_t> before(fe.host(buf), fe.host(buf) + 4096);

  fe.iommu_unmap(fe.dev(buf), 4096);
  head = fe.submit(0, kBlkTIn, 64, buf, 4096);
  auto done = fe.wait(0, 1);
  EXPECT_EQ(fe.status(0, head), kBlkSIoerr);
  EXPECT_EQ(done[0].len, 1U);
  EXPECT_EQ(0, std::memcmp(fe.host(buf), before.data(), 4096));
  ASSERT_FALSE(fe.unanswered_misses().empty());
  EXPECT_EQ(fe.unanswered_misses().back() & ~4095ULL, fe.dev(buf));
  EXPECT_TRUE(be.logged("IOTLB miss not answered in time")) << be.all_logs();
  // Mapped again, the same buffer works.
  fe.iommu_map(fe.dev(buf), 4096);
  head = fe.submit(0, kBlkTIn, 64, buf, 4096);
  fe.wait(0, 1);
  EXPECT_EQ(fe.status(0, head), kBlkSOk);
  session.finish();
}

TEST(VhostBlkIotlb, UpdatesOutsideGuestMemoryAreRefused) {
  Session session(iotlb_options());
  auto& [image, be, fe] = session;
  EXPECT_NE(fe.update(kIovaBase, 4096, 0x1000, kAccessRw), 0U);           // no region there
  EXPECT_NE(fe.update(kIovaBase, 0, fe.uaddr(kGpaBase), kAccessRw), 0U);  // size 0
  EXPECT_NE(fe.update(UINT64_MAX - 4095, 8192, fe.uaddr(kGpaBase), kAccessRw), 0U);  // wraps
  EXPECT_NE(fe.update(kIovaBase, 4096, fe.uaddr(kGpaBase), 7), 0U);  // bad permission
  EXPECT_NE(fe.update(kIovaBase, fe.options().mem_size + 4096, fe.uaddr(kGpaBase), kAccessRw),
            0U);  // runs past the region
  EXPECT_EQ(fe.update(kIovaBase, 4096, fe.uaddr(kGpaBase), kAccessRo), 0U);
  EXPECT_TRUE(be.logged("IOTLB update of"));
  session.finish();
}

// --- the server -------------------------------------------------------------

TEST(VhostBlkServer, ServesOneFrontEndAfterAnother) {
  Image image;
  const std::string path = "/tmp/iomm-vhost-test-" + std::to_string(::getpid()) + ".sock";
  auto server = BlkServer::listen(path);
  ASSERT_TRUE(server.ok()) << server.error().describe();
  UniqueFd stop(::eventfd(0, EFD_CLOEXEC));
  BlkBackendOptions b;
  b.log = [](const std::string&) {};
  Status served;
  std::thread t([&] { served = server->serve(*image.blk, b, stop.get()); });
  for (int round = 0; round < 2; ++round) {
    UniqueFd sock(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size());
    ASSERT_EQ(::connect(sock.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    FrontendOptions o;
    o.iotlb = round == 1;
    Frontend fe(std::move(sock), o);
    fe.setup();
    const uint64_t buf = fe.alloc(4096, 4096);
    const uint16_t head = fe.submit(0, kBlkTIn, 16, buf, 4096);
    fe.wait(0, 1);
    EXPECT_EQ(fe.status(0, head), kBlkSOk);
    EXPECT_EQ(0, std::memcmp(fe.host(buf), image.read(16 * 512, 4096).data(), 4096));
  }
  (void)!::eventfd_write(stop.get(), 1);
  t.join();
  EXPECT_TRUE(served.ok()) << served.error().describe();
  EXPECT_EQ(server->connections(), 2U);
  const Counters c = counters();
  EXPECT_EQ(c.pinned_bytes, 0U);
}

}  // namespace
}  // namespace iomm::vhost
