#include "vhost/blk_backend.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace iomm::vhost {

namespace {

Error protocol_error(Request r, const std::string& why) {
  return Error(EPROTO, std::string(request_name(static_cast<uint32_t>(r))) + ": " + why);
}

// Every request carries exactly the fds it needs: extra ones are refused
// rather than silently closed, missing ones rather than guessed.
Status expect_fds(const Message& msg, size_t count) {
  if (msg.fds.size() != count)
    return protocol_error(
        static_cast<Request>(msg.header.request),
        "carries " + std::to_string(msg.fds.size()) + " fds, expected " + std::to_string(count));
  return {};
}

Status expect_size(const Message& msg, size_t size) {
  if (msg.payload.size() != size)
    return protocol_error(static_cast<Request>(msg.header.request),
                          "payload of " + std::to_string(msg.payload.size()) + " bytes, expected " +
                              std::to_string(size));
  return {};
}

template <typename T>
Status read_payload(const Message& msg, T& out) {
  if (Status s = expect_size(msg, sizeof(T)); !s) return s;
  std::memcpy(&out, msg.payload.data(), sizeof(T));
  return {};
}

template <typename T>
void put(std::vector<uint8_t>& buf, size_t offset, T value) {
  std::memcpy(buf.data() + offset, &value, sizeof(T));
}

}  // namespace

BlkBackend::BlkBackend(const BlkImage& image, BlkBackendOptions options, UniqueFd sock)
    : image_(image), options_(std::move(options)), sock_(std::move(sock)) {
  queues_.reserve(options_.num_queues);
  for (uint16_t i = 0; i < options_.num_queues; ++i) queues_.emplace_back(i);
}

uint64_t BlkBackend::offered_features() const noexcept {
  uint64_t f = bit(kFVersion1) | bit(kFAccessPlatform) | bit(kRingFEventIdx) |
               bit(kRingFIndirectDesc) | bit(kUserFProtocolFeatures) | bit(kBlkFSegMax) |
               bit(kBlkFBlkSize) | bit(kBlkFFlush) | bit(kBlkFMq);
  if (image_.read_only()) f |= bit(kBlkFRo);
  return f;
}

uint64_t BlkBackend::offered_protocol_features() noexcept {
  return bit(kProtocolFMq) | bit(kProtocolFReplyAck) | bit(kProtocolFBackendReq) |
         bit(kProtocolFConfig);
}

std::vector<uint8_t> BlkBackend::config_space() const {
  // struct virtio_blk_config (virtio 1.x 5.2.4), zero past what we set.
  std::vector<uint8_t> c(kMaxConfigSize, 0);
  put<uint64_t>(c, 0, image_.sectors());                                 // capacity
  put<uint32_t>(c, 12, std::max<uint32_t>(options_.queue_size, 3) - 2);  // seg_max
  put<uint32_t>(c, 20, static_cast<uint32_t>(kSectorSize));              // blk_size
  put<uint16_t>(c, 34, options_.num_queues);                             // num_queues
  return c;
}

void BlkBackend::log(const std::string& what) const {
  if (options_.log) {
    options_.log(what);
    return;
  }
  std::fprintf(stderr, "iomm vhost-blk: %s\n", what.c_str());
}

QueueContext BlkBackend::context() const {
  QueueContext ctx;
  ctx.image = &image_;
  ctx.table = table_ ? &*table_ : nullptr;
  ctx.iotlb = iotlb_ ? &*iotlb_ : nullptr;
  ctx.event_idx = (features_ & bit(kRingFEventIdx)) != 0;
  ctx.indirect = (features_ & bit(kRingFIndirectDesc)) != 0;
  ctx.miss_timeout = options_.miss_timeout;
  ctx.log = &options_.log;
  return ctx;
}

Status BlkBackend::reply_u64(const Message& msg, uint64_t value) {
  return send_value(sock_.get(), msg.header.request, kFlagVersion | kFlagReply, value);
}

Status BlkBackend::ack(const Message& msg, bool ok) {
  if (!msg.need_reply() || (protocol_features_ & bit(kProtocolFReplyAck)) == 0) return {};
  return reply_u64(msg, ok ? 0 : 1);
}

Result<Virtqueue*> BlkBackend::queue_for(uint64_t index, Request what) {
  if (index >= queues_.size())
    return protocol_error(what, "queue index " + std::to_string(index) + " out of range (" +
                                    std::to_string(queues_.size()) + " queues)");
  return &queues_[index];
}

void BlkBackend::send_miss(const IotlbMissRequest& miss) {
  if (!backend_channel_.valid()) {
    log("IOTLB miss at " + hex(miss.iova) + " but the front end gave no back-end channel");
    return;
  }
  if (options_.trace) log("IOTLB miss at " + hex(miss.iova) + " perm " + std::to_string(miss.perm));
  ++stats_.misses_sent;
  IotlbMsg m;
  m.iova = miss.iova;
  m.perm = miss.perm;
  m.type = kIotlbMiss;
  if (Status s = send_value(backend_channel_.get(), kBackendIotlbMsg, kFlagVersion, m); !s)
    log("sending an IOTLB miss failed: " + s.error().describe());
}

void BlkBackend::after_run(const std::optional<IotlbMissRequest>& miss) {
  if (miss) send_miss(*miss);
}

void BlkBackend::retry_stalled(Clock::time_point now, bool only_expired) {
  const QueueContext ctx = context();
  for (Virtqueue& q : queues_) {
    if (!q.stalled()) continue;
    if (only_expired && now < *q.miss_deadline()) continue;
    after_run(q.retry(ctx, now));
  }
}

void BlkBackend::reset_device() {
  for (Virtqueue& q : queues_) q.reset();
  iotlb_.reset();
  table_.reset();
  features_ = 0;
}

Status BlkBackend::on_set_features(const Message& msg) {
  uint64_t f = 0;
  if (Status s = read_payload(msg, f); !s) return s;
  if ((f & ~offered_features()) != 0)
    return protocol_error(Request::set_features,
                          "features " + hex(f & ~offered_features()) + " were not offered");
  const bool platform = (f & bit(kFAccessPlatform)) != 0;
  if (platform && (!((protocol_features_ & bit(kProtocolFReplyAck)) != 0) ||
                   (protocol_features_ & bit(kProtocolFBackendReq)) == 0))
    log("VIRTIO_F_ACCESS_PLATFORM without REPLY_ACK and BACKEND_REQ: misses cannot be sent");
  features_ = f;
  if (platform && !iotlb_) {
    auto iotlb = Iotlb::create();
    if (!iotlb) return iotlb.error();
    iotlb_.emplace(std::move(*iotlb));
  } else if (!platform) {
    iotlb_.reset();
  }
  for (Virtqueue& q : queues_) q.forget_ring();
  return ack(msg, true);
}

Status BlkBackend::on_set_mem_table(Message& msg) {
  MemTableHeader h;
  if (msg.payload.size() < sizeof(h))
    return protocol_error(Request::set_mem_table, "payload shorter than its header");
  std::memcpy(&h, msg.payload.data(), sizeof(h));
  if (h.nregions > kMaxMemRegions)
    return protocol_error(
        Request::set_mem_table,
        std::to_string(h.nregions) + " regions, at most " + std::to_string(kMaxMemRegions));
  if (Status s = expect_size(msg, sizeof(h) + h.nregions * sizeof(MemRegion)); !s) return s;
  std::vector<MemRegion> regions(h.nregions);
  // An empty table is valid; memcpy must not see its null data().
  if (h.nregions != 0) {
    std::memcpy(regions.data(), msg.payload.data() + sizeof(h), h.nregions * sizeof(MemRegion));
  }
  // The old rings and IOTLB entries point into the old table: drop them
  // first, so nothing uses memory the front end may have unmapped.
  for (Virtqueue& q : queues_) q.forget_ring();
  if (iotlb_) iotlb_->clear();
  table_.reset();
  auto table = MemoryTable::create(regions, std::move(msg.fds));
  if (!table) return protocol_error(Request::set_mem_table, table.error().describe());
  table_.emplace(std::move(*table));
  if (Status s = ack(msg, true); !s) return s;
  const QueueContext ctx = context();
  for (Virtqueue& q : queues_) after_run(q.process(ctx));
  return {};
}

Status BlkBackend::on_vring_fd(Message& msg, Request what) {
  uint64_t v = 0;
  if (Status s = read_payload(msg, v); !s) return s;
  if ((v & ~(kVringIndexMask | kVringNoFd)) != 0)
    return protocol_error(what, "unknown bits in " + hex(v));
  auto q = queue_for(v & kVringIndexMask, what);
  if (!q) return q.error();
  const bool no_fd = (v & kVringNoFd) != 0;
  if (Status s = expect_fds(msg, no_fd ? 0 : 1); !s) return s;
  UniqueFd fd = no_fd ? UniqueFd() : std::move(msg.fds[0]);
  switch (what) {
    case Request::set_vring_kick:
      if (no_fd) return protocol_error(what, "polling mode (no kick fd) is not supported");
      (*q)->set_kick(std::move(fd));
      // Without protocol features a ring is enabled as soon as it starts.
      if ((features_ & bit(kUserFProtocolFeatures)) == 0) (*q)->set_enabled(true);
      break;
    case Request::set_vring_call:
      (*q)->set_call(std::move(fd));
      break;
    default:
      (*q)->set_err(std::move(fd));
      break;
  }
  if (Status s = ack(msg, true); !s) return s;
  if (what == Request::set_vring_kick) after_run((*q)->process(context()));
  return {};
}

Status BlkBackend::on_iotlb(const Message& msg) {
  IotlbMsg m;
  if (Status s = read_payload(msg, m); !s) return s;
  if (!iotlb_)
    return protocol_error(Request::iotlb_msg, "VIRTIO_F_ACCESS_PLATFORM was not negotiated");
  Status result;
  switch (m.type) {
    case kIotlbUpdate:
      ++stats_.iotlb_updates;
      if (!table_) {
        result = Error(ENOENT, "no memory table");
        break;
      }
      result = iotlb_->update(*table_, m.iova, m.size, m.uaddr, m.perm);
      break;
    case kIotlbInvalidate:
      ++stats_.iotlb_invalidations;
      result = iotlb_->invalidate(m.iova, m.size);
      break;
    default:
      result = Error(EINVAL, "IOTLB message type " + std::to_string(m.type));
      break;
  }
  if (!result)
    log("IOTLB " + std::string(m.type == kIotlbUpdate ? "update" : "message") + " of " +
        hex(m.iova) + "+" + hex(m.size) + " refused: " + result.error().describe());
  if (Status s = ack(msg, result.ok()); !s) return s;
  if (m.type == kIotlbUpdate && result) retry_stalled(Clock::now(), false);
  return {};
}

Status BlkBackend::on_get_config(const Message& msg) {
  ConfigHeader h;
  if (msg.payload.size() < sizeof(h))
    return protocol_error(Request::get_config, "payload shorter than its header");
  std::memcpy(&h, msg.payload.data(), sizeof(h));
  if (h.size > kMaxConfigSize || h.offset > kMaxConfigSize - h.size)
    return protocol_error(Request::get_config, "range " + std::to_string(h.offset) + "+" +
                                                   std::to_string(h.size) +
                                                   " outside the configuration space");
  if (Status s = expect_size(msg, sizeof(h) + h.size); !s) return s;
  const std::vector<uint8_t> space = config_space();
  std::vector<uint8_t> reply(sizeof(h) + h.size);
  std::memcpy(reply.data(), &h, sizeof(h));
  std::memcpy(reply.data() + sizeof(h), space.data() + h.offset, h.size);
  return send_message(sock_.get(), msg.header.request, kFlagVersion | kFlagReply, reply);
}

Status BlkBackend::handle(Message& msg) {
  const auto req = static_cast<Request>(msg.header.request);
  ++stats_.messages;
  if (options_.trace) {
    std::string line = std::string(request_name(msg.header.request)) + " size " +
                       std::to_string(msg.payload.size()) + " fds " +
                       std::to_string(msg.fds.size());
    if (req == Request::iotlb_msg && msg.payload.size() == sizeof(IotlbMsg)) {
      IotlbMsg m;
      std::memcpy(&m, msg.payload.data(), sizeof(m));
      line += " type " + std::to_string(m.type) + " iova " + hex(m.iova) + " size " + hex(m.size) +
              " uaddr " + hex(m.uaddr) + " perm " + std::to_string(m.perm);
    }
    log(line);
  }
  const bool carries_fds = req == Request::set_mem_table || req == Request::set_vring_kick ||
                           req == Request::set_vring_call || req == Request::set_vring_err ||
                           req == Request::set_backend_req_fd;
  if (!carries_fds) {
    if (Status s = expect_fds(msg, 0); !s) return s;
  }
  switch (req) {
    case Request::get_features:
      if (Status s = expect_size(msg, 0); !s) return s;
      return reply_u64(msg, offered_features());
    case Request::set_features:
      return on_set_features(msg);
    case Request::get_protocol_features:
      if (Status s = expect_size(msg, 0); !s) return s;
      return reply_u64(msg, offered_protocol_features());
    case Request::set_protocol_features: {
      uint64_t f = 0;
      if (Status s = read_payload(msg, f); !s) return s;
      if ((f & ~offered_protocol_features()) != 0)
        return protocol_error(req, "protocol features " + hex(f & ~offered_protocol_features()) +
                                       " were not offered");
      protocol_features_ = f;
      return ack(msg, true);
    }
    case Request::set_owner:
      if (Status s = expect_size(msg, 0); !s) return s;
      return ack(msg, true);
    case Request::reset_owner:
      if (Status s = expect_size(msg, 0); !s) return s;
      reset_device();
      return ack(msg, true);
    case Request::get_queue_num:
      if (Status s = expect_size(msg, 0); !s) return s;
      return reply_u64(msg, queues_.size());
    case Request::set_mem_table:
      return on_set_mem_table(msg);
    case Request::set_vring_num:
    case Request::set_vring_base:
    case Request::get_vring_base:
    case Request::set_vring_enable: {
      VringState st;
      if (Status s = read_payload(msg, st); !s) return s;
      auto q = queue_for(st.index, req);
      if (!q) return q.error();
      if (req == Request::get_vring_base) {
        const VringState out{st.index, (*q)->stop()};
        return send_value(sock_.get(), msg.header.request, kFlagVersion | kFlagReply, out);
      }
      if (req == Request::set_vring_num) {
        if (st.num == 0 || st.num > options_.queue_size || (st.num & (st.num - 1)) != 0)
          return protocol_error(
              req, "queue size " + std::to_string(st.num) +
                       " is not a power of two <= " + std::to_string(options_.queue_size));
        (*q)->set_num(static_cast<uint16_t>(st.num));
      } else if (req == Request::set_vring_base) {
        if (st.num > UINT16_MAX)
          return protocol_error(req, "base " + std::to_string(st.num) + " beyond 16 bits");
        (*q)->set_base(static_cast<uint16_t>(st.num));
      } else {
        if ((features_ & bit(kUserFProtocolFeatures)) == 0)
          return protocol_error(req, "VHOST_USER_F_PROTOCOL_FEATURES was not negotiated");
        if (st.num > 1) return protocol_error(req, "enable value " + std::to_string(st.num));
        (*q)->set_enabled(st.num == 1);
      }
      if (Status s = ack(msg, true); !s) return s;
      if (req == Request::set_vring_enable && st.num == 1) after_run((*q)->process(context()));
      return {};
    }
    case Request::set_vring_addr: {
      VringAddr a;
      if (Status s = read_payload(msg, a); !s) return s;
      auto q = queue_for(a.index, req);
      if (!q) return q.error();
      (*q)->set_addr(a);
      return ack(msg, true);
    }
    case Request::set_vring_kick:
    case Request::set_vring_call:
    case Request::set_vring_err:
      return on_vring_fd(msg, req);
    case Request::set_backend_req_fd:
      if (Status s = expect_size(msg, 0); !s) return s;
      if (Status s = expect_fds(msg, 1); !s) return s;
      if ((protocol_features_ & bit(kProtocolFBackendReq)) == 0)
        return protocol_error(req, "BACKEND_REQ was not negotiated");
      backend_channel_ = std::move(msg.fds[0]);
      // Misses must never block the device on a front end that is busy.
      if (int fl = ::fcntl(backend_channel_.get(), F_GETFL); fl >= 0)
        (void)::fcntl(backend_channel_.get(), F_SETFL, fl | O_NONBLOCK);
      return ack(msg, true);
    case Request::iotlb_msg:
      return on_iotlb(msg);
    case Request::get_config:
      return on_get_config(msg);
    default:
      return protocol_error(req, "request " + std::to_string(msg.header.request) +
                                     " is not supported by this back end");
  }
}

void BlkBackend::log_summary() const {
  uint64_t completed = 0;
  uint64_t errors = 0;
  for (const Virtqueue& q : queues_) {
    completed += q.stats().completed;
    errors += q.stats().errors;
  }
  log("connection summary: features " + hex(features_) + ", protocol features " +
      hex(protocol_features_) + ", " + std::to_string(stats_.messages) + " messages, " +
      std::to_string(completed) + " requests (" + std::to_string(errors) + " failed), " +
      std::to_string(stats_.iotlb_updates) + " IOTLB updates, " +
      std::to_string(stats_.iotlb_invalidations) + " invalidations, " +
      std::to_string(stats_.misses_sent) + " misses");
}

Status BlkBackend::run(int stop_fd) {
  std::vector<pollfd> fds;
  std::vector<int> kick_of;  // queue index per kick entry
  for (;;) {
    fds.clear();
    kick_of.clear();
    fds.push_back({stop_fd, POLLIN, 0});
    fds.push_back({sock_.get(), POLLIN, 0});
    for (const Virtqueue& q : queues_) {
      if (q.kick_fd() < 0) continue;
      fds.push_back({q.kick_fd(), POLLIN, 0});
      kick_of.push_back(q.index());
    }
    int timeout = -1;
    const Clock::time_point now = Clock::now();
    for (const Virtqueue& q : queues_) {
      if (!q.stalled()) continue;
      const auto left =
          std::chrono::ceil<std::chrono::milliseconds>(*q.miss_deadline() - now).count();
      const int ms = static_cast<int>(std::clamp<int64_t>(left, 0, INT32_MAX));
      timeout = timeout < 0 ? ms : std::min(timeout, ms);
    }
    const int n = ::poll(fds.data(), fds.size(), timeout);
    if (n < 0 && errno != EINTR) return Error(errno, "poll");
    if (n > 0) {
      if (fds[0].revents != 0) return Error(ECANCELED, "stopped");
      if (fds[1].revents != 0) {
        auto msg = receive_message(sock_.get());
        if (!msg) {
          if (msg.code() != ECONNRESET) log("closing the connection: " + msg.error().message());
          return std::move(msg).error();
        }
        if (Status s = handle(*msg); !s) {
          log("closing the connection: " + s.error().message());
          return s;
        }
      }
      const QueueContext ctx = context();
      for (size_t i = 2; i < fds.size(); ++i) {
        if (fds[i].revents == 0) continue;
        Virtqueue& q = queues_[kick_of[i - 2]];
        // A message may have replaced the fd since poll() returned.
        if (q.kick_fd() != fds[i].fd) continue;
        after_run(q.on_kick(ctx));
      }
    }
    retry_stalled(Clock::now(), true);
  }
}

}  // namespace iomm::vhost
