// A small vhost-user front end for the tests: it plays QEMU's part against
// an iomm::vhost back end over a socket: shared memfd guest memory, the
// negotiation, split rings it fills itself, and, in IOTLB mode, a guest
// IOMMU of its own that answers the back end's misses with UPDATEs and
// sends INVALIDATEs. Failures throw std::runtime_error (a test failure).
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <ctime>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "iomm/vring_cache.hpp"
#include "vhost/blk_backend.hpp"
#include "vhost/message.hpp"
#include "vhost/protocol.hpp"
#include "vhost/unique_fd.hpp"

namespace iomm::vhost::test {

inline void fe_check(bool ok, const std::string& what) {
  if (!ok) throw std::runtime_error("test front end: " + what);
}

// Guest-physical base of guest memory, and the IOVA the guest IOMMU maps
// it at: distinct, so a back end mixing the spaces up fails.
inline constexpr uint64_t kGpaBase = 0x40000000;
inline constexpr uint64_t kIovaBase = 0x7000000000;

struct FrontendOptions {
  bool iotlb = false;
  uint16_t num_queues = 1;
  uint16_t queue_size = 64;
  bool event_idx = true;
  bool indirect = true;
  uint64_t mem_size = 8ULL << 20;
  // Seal guest memory against shrinking and growing, as QEMU's
  // memory-backend-memfd does by default (seal=on); the back end then
  // reads the rings through plain pointers. false: a file that may shrink
  // (every ring access a guarded copy).
  bool seal = true;
  // Answer misses for mapped pages (false: let them time out).
  bool serve_misses = true;
  // Bytes mapped per UPDATE answering a miss (a power of two).
  uint64_t update_size = 4096;
  // wait() sleeps on the call eventfd, moving used_event along (false:
  // leaves used_event to the test and polls).
  bool interrupt_wait = true;
};

struct Completion {
  uint16_t id;
  uint32_t len;
};

class Frontend {
 public:
  Frontend(UniqueFd sock, FrontendOptions o) : sock_(std::move(sock)), o_(o) {
    fd_ = UniqueFd(::memfd_create("guest", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    fe_check(fd_.valid() && ::ftruncate(fd_.get(), static_cast<off_t>(o_.mem_size)) == 0, "memfd");
    if (o_.seal)
      fe_check(::fcntl(fd_.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) == 0, "seal");
    void* p = ::mmap(nullptr, o_.mem_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(), 0);
    fe_check(p != MAP_FAILED, "mmap");
    mem_ = static_cast<uint8_t*>(p);
    queues_.resize(o_.num_queues);
    // Rings first, 3 pages per queue, then headers/statuses/tables per queue.
    for (uint16_t q = 0; q < o_.num_queues; ++q) {
      Queue& Q = queues_[q];
      Q.desc = alloc(16ULL * o_.queue_size, 4096);
      Q.avail = alloc(6 + 2ULL * o_.queue_size, 4096);
      Q.used = alloc(6 + 8ULL * o_.queue_size, 4096);
      Q.hdrs = alloc(16ULL * o_.queue_size, 16);
      Q.status = alloc(o_.queue_size, 16);
      Q.tables = alloc(16ULL * 4 * o_.queue_size, 16);
      for (uint16_t i = 0; i < o_.queue_size; ++i) Q.free.insert(i);
      Q.kick = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
      Q.call = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    }
    if (o_.iotlb) iommu_map(kIovaBase, o_.mem_size);
  }
  ~Frontend() { ::munmap(mem_, o_.mem_size); }

  // --- memory -------------------------------------------------------------
  uint64_t alloc(uint64_t size, uint64_t align = 64) {
    next_ = (next_ + align - 1) & ~(align - 1);
    const uint64_t at = next_;
    next_ += size;
    fe_check(next_ <= o_.mem_size, "guest memory exhausted");
    return kGpaBase + at;
  }
  uint8_t* host(uint64_t gpa) { return mem_ + (gpa - kGpaBase); }
  // The address the device is given for a guest-physical address.
  uint64_t dev(uint64_t gpa) const { return o_.iotlb ? gpa - kGpaBase + kIovaBase : gpa; }
  uint64_t uaddr(uint64_t gpa) const { return reinterpret_cast<uint64_t>(mem_) + (gpa - kGpaBase); }
  int memfd() const { return fd_.get(); }
  uint8_t* base() { return mem_; }

  // --- guest IOMMU (IOTLB mode) ---------------------------------------------
  void iommu_map(uint64_t iova, uint64_t size) { iommu_[iova] = size; }
  // Unmap in the guest IOMMU and invalidate the device's IOTLB.
  void iommu_unmap(uint64_t iova, uint64_t size) {
    for (auto it = iommu_.begin(); it != iommu_.end();) {
      const uint64_t s = it->first, e = it->first + it->second;
      if (e <= iova || s >= iova + size) {
        ++it;
        continue;
      }
      it = iommu_.erase(it);
      if (s < iova) iommu_[s] = iova - s;
      if (e > iova + size) iommu_[iova + size] = e - (iova + size);
    }
    invalidate(iova, size);
  }
  void invalidate(uint64_t iova, uint64_t size) {
    IotlbMsg m;
    m.iova = iova;
    m.size = size;
    m.type = kIotlbInvalidate;
    request_ack(Request::iotlb_msg, m);
  }
  // UPDATE as QEMU sends it; returns the ack (0 = accepted).
  uint64_t update(uint64_t iova, uint64_t size, uint64_t uaddr, uint8_t perm) {
    IotlbMsg m;
    m.iova = iova;
    m.size = size;
    m.uaddr = uaddr;
    m.perm = perm;
    m.type = kIotlbUpdate;
    return request_ack(Request::iotlb_msg, m, false);
  }
  bool iommu_mapped(uint64_t iova) const {
    auto it = iommu_.upper_bound(iova);
    if (it == iommu_.begin()) return false;
    --it;
    return iova - it->first < it->second;
  }
  uint64_t misses() const { return misses_; }
  std::vector<uint64_t> unanswered_misses() const { return unanswered_; }

  // --- messages -------------------------------------------------------------
  void send(Request r, std::span<const uint8_t> payload, std::span<const int> fds = {},
            uint32_t flags = kFlagVersion) {
    fe_check(send_message(sock_.get(), static_cast<uint32_t>(r), flags, payload, fds).ok(),
             std::string("send ") + request_name(static_cast<uint32_t>(r)));
  }
  template <typename T>
  void send_v(Request r, const T& v, std::span<const int> fds = {}, uint32_t flags = kFlagVersion) {
    send(r, std::span(reinterpret_cast<const uint8_t*>(&v), sizeof(T)), fds, flags);
  }
  Message reply(Request r) {
    auto m = receive_message(sock_.get());
    fe_check(m.ok(), std::string("no reply to ") + request_name(static_cast<uint32_t>(r)) +
                         (m.ok() ? "" : ": " + m.error().describe()));
    fe_check(m->header.request == static_cast<uint32_t>(r) && (m->header.flags & kFlagReply),
             "reply header");
    return std::move(*m);
  }
  uint64_t get_u64(Request r) {
    send(r, {});
    Message m = reply(r);
    uint64_t v = 0;
    fe_check(m.payload.size() == 8, "u64 reply size");
    std::memcpy(&v, m.payload.data(), 8);
    return v;
  }
  // Send with NEED_REPLY and return the ack (throws on a missing reply
  // when `must_ack`; with must_ack false, a non-zero ack is returned).
  template <typename T>
  uint64_t request_ack(Request r, const T& v, bool must_ack = true, std::span<const int> fds = {}) {
    send_v(r, v, fds, kFlagVersion | kFlagNeedReply);
    Message m = reply(r);
    uint64_t ack = 0;
    fe_check(m.payload.size() == 8, "ack size");
    std::memcpy(&ack, m.payload.data(), 8);
    if (must_ack)
      fe_check(ack == 0, std::string("nack for ") + request_name(static_cast<uint32_t>(r)));
    return ack;
  }

  uint64_t features() const {
    uint64_t f = bit(kFVersion1) | bit(kUserFProtocolFeatures) | bit(kBlkFFlush) |
                 bit(kBlkFBlkSize) | bit(kBlkFSegMax);
    if (o_.event_idx) f |= bit(kRingFEventIdx);
    if (o_.indirect) f |= bit(kRingFIndirectDesc);
    if (o_.iotlb) f |= bit(kFAccessPlatform);
    if (o_.num_queues > 1) f |= bit(kBlkFMq);
    return f;
  }

  // Negotiation as QEMU 7.2 does it, then the memory table.
  void negotiate() {
    const uint64_t offered = get_u64(Request::get_features);
    fe_check((offered & features()) == features(), "back end lacks a feature we need");
    const uint64_t pf = get_u64(Request::get_protocol_features);
    const uint64_t want = bit(kProtocolFMq) | bit(kProtocolFReplyAck) | bit(kProtocolFBackendReq) |
                          bit(kProtocolFConfig);
    fe_check((pf & want) == want, "protocol features");
    send_v(Request::set_protocol_features, want);
    fe_check(get_u64(Request::get_queue_num) >= o_.num_queues, "queue count");
    int sv[2];
    fe_check(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair");
    channel_ = UniqueFd(sv[0]);
    UniqueFd theirs(sv[1]);
    const int fds[1] = {theirs.get()};
    send(Request::set_backend_req_fd, {}, fds, kFlagVersion | kFlagNeedReply);
    fe_check(reply(Request::set_backend_req_fd).payload.size() == 8, "ack");
    send(Request::set_owner, {});
    request_ack(Request::set_features, features());
    set_mem_table();
  }
  void set_mem_table() {
    std::vector<uint8_t> p(sizeof(MemTableHeader) + sizeof(MemRegion));
    MemTableHeader h{1, 0};
    MemRegion r{kGpaBase, o_.mem_size, reinterpret_cast<uint64_t>(mem_), 0};
    std::memcpy(p.data(), &h, sizeof(h));
    std::memcpy(p.data() + sizeof(h), &r, sizeof(r));
    const int fds[1] = {fd_.get()};
    send(Request::set_mem_table, p, fds, kFlagVersion | kFlagNeedReply);
    uint64_t ack = 1;
    Message m = reply(Request::set_mem_table);
    std::memcpy(&ack, m.payload.data(), 8);
    fe_check(ack == 0, "SET_MEM_TABLE nack");
  }
  // Ring addresses: front-end virtual addresses in GPA mode, IOVAs with an
  // IOMMU (the vhost-user rule).
  VringAddr ring_addr(uint16_t q) {
    Queue& Q = queues_[q];
    VringAddr a;
    a.index = q;
    if (o_.iotlb) {
      a.desc = dev(Q.desc);
      a.avail = dev(Q.avail);
      a.used = dev(Q.used);
    } else {
      a.desc = uaddr(Q.desc);
      a.avail = uaddr(Q.avail);
      a.used = uaddr(Q.used);
    }
    return a;
  }
  void start_queue(uint16_t q, uint16_t base = 0) {
    Queue& Q = queues_[q];
    request_ack(Request::set_vring_num, VringState{q, o_.queue_size});
    request_ack(Request::set_vring_base, VringState{q, base});
    Q.avail_idx = base;
    Q.last_used = base;
    request_ack(Request::set_vring_addr, ring_addr(q));
    int call[1] = {Q.call.get()};
    request_ack(Request::set_vring_call, uint64_t{q}, true, call);
    int kick[1] = {Q.kick.get()};
    request_ack(Request::set_vring_kick, uint64_t{q}, true, kick);
    request_ack(Request::set_vring_enable, VringState{q, 1});
  }
  void setup() {
    negotiate();
    for (uint16_t q = 0; q < o_.num_queues; ++q) start_queue(q);
  }
  uint16_t stop_queue(uint16_t q) {
    send_v(Request::get_vring_base, VringState{q, 0});
    Message m = reply(Request::get_vring_base);
    VringState st;
    fe_check(m.payload.size() == sizeof(st), "vring state size");
    std::memcpy(&st, m.payload.data(), sizeof(st));
    return static_cast<uint16_t>(st.num);
  }
  void close() { sock_.reset(); }

  // --- rings ----------------------------------------------------------------
  VringDesc* desc(uint16_t q, uint16_t i) {
    return reinterpret_cast<VringDesc*>(host(queues_[q].desc)) + i;
  }
  uint16_t* avail_ring(uint16_t q) { return reinterpret_cast<uint16_t*>(host(queues_[q].avail)); }
  uint16_t* used_ring16(uint16_t q) { return reinterpret_cast<uint16_t*>(host(queues_[q].used)); }
  void set_used_event(uint16_t q, uint16_t v) { avail_ring(q)[2 + o_.queue_size] = v; }
  uint16_t used_idx(uint16_t q) {
    return std::atomic_ref<uint16_t>(used_ring16(q)[1]).load(std::memory_order_acquire);
  }
  // Make head available and kick.
  void publish(uint16_t q, uint16_t head, bool kick = true) {
    Queue& Q = queues_[q];
    avail_ring(q)[2 + Q.avail_idx % o_.queue_size] = head;
    ++Q.avail_idx;
    std::atomic_ref<uint16_t>(avail_ring(q)[1]).store(Q.avail_idx, std::memory_order_release);
    if (kick) this->kick(q);
  }
  void kick(uint16_t q) { (void)!::eventfd_write(queues_[q].kick.get(), 1); }
  uint16_t avail_idx(uint16_t q) const { return queues_[q].avail_idx; }
  // Kick only if the device asked for it (VIRTIO_RING_F_EVENT_IDX:
  // avail_event passed since `old_avail`), as a driver does after
  // publishing: a device that is still working through the ring asked for
  // nothing and will see the new entries when it reads avail->idx again.
  // Returns whether it kicked.
  bool kick_if_needed(uint16_t q, uint16_t old_avail) {
    std::atomic_thread_fence(std::memory_order_seq_cst);  // avail->idx before avail_event
    const uint16_t event = std::atomic_ref<uint16_t>(used_ring16(q)[2 + 4 * o_.queue_size])
                               .load(std::memory_order_relaxed);
    const uint16_t now = queues_[q].avail_idx;
    if (static_cast<uint16_t>(now - event - 1) >= static_cast<uint16_t>(now - old_avail))
      return false;
    kick(q);
    return true;
  }
  uint64_t calls(uint16_t q) {
    eventfd_t v = 0;
    if (::eventfd_read(queues_[q].call.get(), &v) == 0) queues_[q].calls += v;
    return queues_[q].calls;
  }
  uint16_t take_desc(uint16_t q) {
    Queue& Q = queues_[q];
    fe_check(!Q.free.empty(), "out of descriptors");
    const uint16_t d = *Q.free.begin();
    Q.free.erase(Q.free.begin());
    return d;
  }

  // A virtio-blk request: header, data (device-writable for IN and
  // GET_ID), status. Returns the head. With indirect, one descriptor points
  // at a table in guest memory.
  uint16_t submit(uint16_t q, uint32_t type, uint64_t sector, uint64_t data_gpa, uint32_t len,
                  bool indirect = false, bool kick = true) {
    Queue& Q = queues_[q];
    const bool in = type == kBlkTIn || type == kBlkTGetId;
    VringDesc chain[3];
    int n = 0;
    const uint16_t head = take_desc(q);
    auto* hdr = reinterpret_cast<BlkOutHdr*>(host(Q.hdrs + 16ULL * head));
    *hdr = BlkOutHdr{type, 0, sector};
    host(Q.status + head)[0] = 0xff;
    chain[n++] = VringDesc{dev(Q.hdrs + 16ULL * head), 16, 0, 0};
    if (len > 0) chain[n++] = VringDesc{dev(data_gpa), len, in ? kVringDescFWrite : uint16_t{0}, 0};
    chain[n++] = VringDesc{dev(Q.status + head), 1, kVringDescFWrite, 0};
    std::vector<uint16_t> used_descs{head};
    if (indirect) {
      auto* table = reinterpret_cast<VringDesc*>(host(Q.tables + 64ULL * head));
      for (int i = 0; i < n; ++i) {
        table[i] = chain[i];
        if (i + 1 < n) {
          table[i].flags |= kVringDescFNext;
          table[i].next = static_cast<uint16_t>(i + 1);
        }
      }
      *desc(q, head) = VringDesc{dev(Q.tables + 64ULL * head), static_cast<uint32_t>(16 * n),
                                 kVringDescFIndirect, 0};
    } else {
      uint16_t cur = head;
      for (int i = 0; i < n; ++i) {
        VringDesc d = chain[i];
        if (i + 1 < n) {
          const uint16_t nx = take_desc(q);
          used_descs.push_back(nx);
          d.flags |= kVringDescFNext;
          d.next = nx;
          *desc(q, cur) = d;
          cur = nx;
        } else {
          *desc(q, cur) = d;
        }
      }
    }
    Q.chains[head] = used_descs;
    publish(q, head, kick);
    return head;
  }
  uint8_t status(uint16_t q, uint16_t head) { return host(queues_[q].status + head)[0]; }

  // Wait until `count` more completions arrive on q, answering misses
  // meanwhile; returns them in used-ring order.
  std::vector<Completion> wait(uint16_t q, uint16_t count,
                               std::chrono::milliseconds limit = std::chrono::seconds(20)) {
    Queue& Q = queues_[q];
    const auto deadline = std::chrono::steady_clock::now() + limit;
    auto arrived = [&] { return arrived_since_last(q) >= count; };
    while (!arrived()) {
      fe_check(std::chrono::steady_clock::now() < deadline, "timed out waiting for completions");
      // Ask for an interrupt at the next completion (a driver's
      // virtqueue_enable_cb), then look again before sleeping on it.
      if (o_.interrupt_wait && o_.event_idx) {
        std::atomic_ref<uint16_t>(avail_ring(q)[2 + o_.queue_size])
            .store(used_idx(q), std::memory_order_seq_cst);
      }
      if (arrived()) break;
      pollfd p[2] = {{Q.call.get(), POLLIN, 0}, {channel_.get(), POLLIN, 0}};
      if (::poll(p, channel_.valid() ? 2 : 1, o_.interrupt_wait ? 10 : 1) <= 0) continue;
      if ((p[0].revents & POLLIN) != 0) (void)calls(q);
      if ((p[1].revents & POLLIN) != 0) serve_channel();
    }
    return take_completions(q, count);
  }
  // The same without interrupts, as a driver's poll queue: used_event is
  // kept half the index space ahead of the completions, so the device never
  // signals, and the used ring is polled (yielding the CPU between looks).
  std::vector<Completion> poll_wait(uint16_t q, uint16_t count,
                                    std::chrono::milliseconds limit = std::chrono::seconds(20)) {
    Queue& Q = queues_[q];
    const auto deadline = std::chrono::steady_clock::now() + limit;
    set_used_event(q, static_cast<uint16_t>(Q.last_used + 0x8000));
    while (arrived_since_last(q) < count) {
      fe_check(std::chrono::steady_clock::now() < deadline, "timed out polling for completions");
      pollfd p{channel_.get(), POLLIN, 0};
      if (channel_.valid() && ::poll(&p, 1, 0) > 0 && (p.revents & POLLIN) != 0) serve_channel();
      std::this_thread::yield();
    }
    return take_completions(q, count);
  }
  uint16_t arrived_since_last(uint16_t q) {
    return static_cast<uint16_t>(used_idx(q) - queues_[q].last_used);
  }
  // The next `count` used entries (they have arrived), their descriptors
  // freed.
  std::vector<Completion> take_completions(uint16_t q, uint16_t count) {
    Queue& Q = queues_[q];
    std::vector<Completion> out;
    const uint32_t* ring = reinterpret_cast<const uint32_t*>(used_ring16(q) + 2);
    for (uint16_t i = 0; i < count; ++i) {
      const uint16_t slot = (Q.last_used + i) % o_.queue_size;
      Completion c{static_cast<uint16_t>(ring[2 * slot]), ring[2 * slot + 1]};
      out.push_back(c);
      auto it = Q.chains.find(c.id);
      if (it != Q.chains.end()) {
        for (uint16_t d : it->second) Q.free.insert(d);
        Q.chains.erase(it);
      }
    }
    Q.last_used = static_cast<uint16_t>(Q.last_used + count);
    return out;
  }
  // Answer one message of the back end (readable on the back-end channel).
  void serve_channel() {
    auto m = receive_message(channel_.get());
    fe_check(m.ok(), "back-end channel: " + (m.ok() ? std::string() : m.error().describe()));
    IotlbMsg msg;
    fe_check(m->header.request == kBackendIotlbMsg && m->payload.size() == sizeof(msg),
             "back-end channel message");
    std::memcpy(&msg, m->payload.data(), sizeof(msg));
    fe_check(msg.type == kIotlbMiss, "back-end channel: not a miss");
    ++misses_;
    const uint64_t page = msg.iova & ~(o_.update_size - 1);
    if (!o_.serve_misses || !iommu_mapped(page) || !iommu_mapped(page + o_.update_size - 1)) {
      unanswered_.push_back(msg.iova);
      return;
    }
    const uint64_t gpa = page - kIovaBase + kGpaBase;
    fe_check(update(page, o_.update_size, uaddr(gpa), kAccessRw) == 0, "UPDATE refused");
  }
  FrontendOptions& options() { return o_; }

 private:
  struct Queue {
    uint64_t desc = 0, avail = 0, used = 0, hdrs = 0, status = 0, tables = 0;
    uint16_t avail_idx = 0, last_used = 0;
    std::set<uint16_t> free;
    std::map<uint16_t, std::vector<uint16_t>> chains;
    UniqueFd kick, call;
    uint64_t calls = 0;
  };
  UniqueFd sock_;
  FrontendOptions o_;
  UniqueFd fd_;
  uint8_t* mem_ = nullptr;
  uint64_t next_ = 0;
  std::vector<Queue> queues_;
  UniqueFd channel_;
  std::map<uint64_t, uint64_t> iommu_;  // iova -> size
  uint64_t misses_ = 0;
  std::vector<uint64_t> unanswered_;
};

// A back end on its own thread, serving one end of a socketpair; the test
// front end gets the other end.
class BackendThread {
 public:
  BackendThread(const BlkImage& image, BlkBackendOptions options) : options_(std::move(options)) {
    options_.log = [this](const std::string& s) {
      std::lock_guard lk(mu_);
      logs_.push_back(s);
    };
    int sv[2];
    fe_check(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair");
    mine_ = UniqueFd(sv[1]);
    stop_ = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    thread_ = std::thread([this, &image, fd = sv[0]] {
      BlkBackend backend(image, options_, UniqueFd(fd));
      const Status s = backend.run(stop_.get());
      std::lock_guard lk(mu_);
      result_ = s;
      stats_ = backend.stats();
      for (const Virtqueue& q : backend.queues()) queue_stats_.push_back(q.stats());
    });
  }
  ~BackendThread() {
    const Status ignored = stop();
    (void)ignored;
  }
  UniqueFd take_socket() { return std::move(mine_); }
  // The CPU time the back end's thread has used so far, in nanoseconds.
  uint64_t cpu_ns() {
    clockid_t clock{};
    fe_check(::pthread_getcpuclockid(thread_.native_handle(), &clock) == 0, "pthread clock");
    timespec ts{};
    fe_check(::clock_gettime(clock, &ts) == 0, "clock_gettime");
    return static_cast<uint64_t>(ts.tv_sec) * 1000000000ULL + static_cast<uint64_t>(ts.tv_nsec);
  }
  // Stop (if still running) and return how run() ended.
  Status stop() {
    if (thread_.joinable()) {
      (void)!::eventfd_write(stop_.get(), 1);
      thread_.join();
    }
    std::lock_guard lk(mu_);
    return result_;
  }
  // Wait for run() to end on its own (the connection closed).
  Status join() {
    if (thread_.joinable()) thread_.join();
    std::lock_guard lk(mu_);
    return result_;
  }
  bool logged(const std::string& needle) {
    std::lock_guard lk(mu_);
    for (const std::string& l : logs_)
      if (l.find(needle) != std::string::npos) return true;
    return false;
  }
  std::string all_logs() {
    std::lock_guard lk(mu_);
    std::string s;
    for (const std::string& l : logs_) s += l + "\n";
    return s;
  }
  BlkBackendStats stats() {
    std::lock_guard lk(mu_);
    return stats_;
  }
  std::vector<QueueStats> queue_stats() {
    std::lock_guard lk(mu_);
    return queue_stats_;
  }

 private:
  BlkBackendOptions options_;
  UniqueFd mine_, stop_;
  std::mutex mu_;
  std::vector<std::string> logs_;
  Status result_;
  BlkBackendStats stats_;
  std::vector<QueueStats> queue_stats_;
  std::thread thread_;
};

}  // namespace iomm::vhost::test
