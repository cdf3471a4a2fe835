// A vhost-user-blk back end serving one front end connection: the device
// state machine, message handling and the event loop of the connection.
//
// Contract
// - Ownership: a BlkBackend owns the connection socket, the memory table,
//   the IOTLB, the queues and their fds; destroying it releases them all
//   (nothing was pinned or charged). It borrows the image.
// - handle() processes one message. A message that breaks the protocol
//   (wrong payload size, an out-of-range queue index, missing or extra fds,
//   a bad memory table, an unknown or unsupported request, a feature that
//   was not offered) returns an error: the connection must be closed; the
//   reason is the error's message. With REPLY_ACK, a request that fails
//   without breaking the protocol (an IOTLB update naming memory the table
//   does not hold) is answered with a non-zero ack.
// - run() serves until the front end disconnects (ECONNRESET), a message is
//   refused (its error), or stop_fd becomes readable (ECANCELED). Requests
//   are processed on the same thread as messages, so when run() returns no
//   request is in flight.
// - Not thread-safe: one thread drives a back end.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <vector>

#include "iomm/result.hpp"
#include "vhost/blk_image.hpp"
#include "vhost/iotlb.hpp"
#include "vhost/memory_table.hpp"
#include "vhost/message.hpp"
#include "vhost/unique_fd.hpp"
#include "vhost/virtqueue.hpp"

namespace iomm::vhost {

struct BlkBackendOptions {
  uint16_t num_queues = 1;
  // The largest queue size the front end may set (SET_VRING_NUM).
  uint16_t queue_size = 256;
  // How long a queue waits for the UPDATE that answers its IOTLB miss
  // before the request fails.
  std::chrono::milliseconds miss_timeout{2000};
  LogFn log;  // empty: stderr
  // Log every message and IOTLB miss (a protocol trace).
  bool trace = false;
};

struct BlkBackendStats {
  uint64_t messages = 0;
  uint64_t iotlb_updates = 0;
  uint64_t iotlb_invalidations = 0;
  uint64_t misses_sent = 0;
};

class BlkBackend {
 public:
  BlkBackend(const BlkImage& image, BlkBackendOptions options, UniqueFd sock);

  Status run(int stop_fd);
  Status handle(Message& msg);

  [[nodiscard]] uint64_t offered_features() const noexcept;
  [[nodiscard]] static uint64_t offered_protocol_features() noexcept;
  [[nodiscard]] const std::vector<Virtqueue>& queues() const noexcept { return queues_; }
  [[nodiscard]] const Iotlb* iotlb() const noexcept { return iotlb_ ? &*iotlb_ : nullptr; }
  [[nodiscard]] int socket() const noexcept { return sock_.get(); }
  [[nodiscard]] const BlkBackendStats& stats() const noexcept { return stats_; }
  // One log line: negotiated features, requests, IOTLB traffic.
  void log_summary() const;
  [[nodiscard]] uint64_t acked_features() const noexcept { return features_; }
  // The virtio-blk configuration space (struct virtio_blk_config).
  [[nodiscard]] std::vector<uint8_t> config_space() const;

 private:
  void log(const std::string& what) const;
  QueueContext context() const;
  Status reply_u64(const Message& msg, uint64_t value);
  Status ack(const Message& msg, bool ok);
  Result<Virtqueue*> queue_for(uint64_t index, Request what);
  void send_miss(const IotlbMissRequest& miss);
  void after_run(const std::optional<IotlbMissRequest>& miss);
  void retry_stalled(Clock::time_point now, bool only_expired);
  void reset_device();

  Status on_set_features(const Message& msg);
  Status on_set_mem_table(Message& msg);
  Status on_vring_fd(Message& msg, Request what);
  Status on_iotlb(const Message& msg);
  Status on_get_config(const Message& msg);

  const BlkImage& image_;
  BlkBackendOptions options_;
  UniqueFd sock_;
  UniqueFd backend_channel_;
  uint64_t features_ = 0;
  uint64_t protocol_features_ = 0;
  std::optional<MemoryTable> table_;
  std::optional<Iotlb> iotlb_;
  std::vector<Virtqueue> queues_;
  BlkBackendStats stats_;
};

}  // namespace iomm::vhost
