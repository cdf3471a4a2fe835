// One virtio-blk virtqueue of a vhost-user back end: its vhost-user state
// (size, ring addresses, base, kick/call/err fds, enabled, started) and the
// processing of its available ring.
//
// Contract
// - A queue runs when it is started (a kick fd arrived and no
//   GET_VRING_BASE stopped it), enabled, addressed and the device has
//   memory. process() completes requests in order until the available ring
//   is empty, then signals the call fd as the driver asked (used_event with
//   VIRTIO_RING_F_EVENT_IDX, else the avail flags).
// - An IOTLB miss (a ring or buffer address the IOTLB does not hold) stalls
//   the queue without consuming the request: process() returns the address
//   to ask for, and the queue waits for an UPDATE (retry()) until its
//   deadline; after the deadline the request that missed completes with
//   VIRTIO_BLK_S_IOERR (or, if the ring itself cannot be reached, the queue
//   breaks).
// - The rings are read and written through iomm::VringCache over the
//   Ioas of the queue's address space (the memory table's, in
//   guest-physical addresses; the IOTLB's, in IOVAs): plain loads and
//   stores through cached pointers where the memory is sealed against
//   shrinking, guarded copies otherwise. An IOTLB INVALIDATE is an unmap of
//   that Ioas, which invalidates the cached pointers through the cache's
//   interval notifiers; the queue takes no step of its own. A ring the
//   IOTLB does not hold reads as ENOENT: a miss, as for buffers.
// - A malformed chain completes with used length 0 (nothing written); a
//   queue whose ring cannot be used (addresses outside guest memory,
//   misaligned, an available index that jumps past the queue size, a head
//   out of range) breaks: it is logged and processes nothing more until it
//   is set up again (SET_VRING_ADDR / _NUM / _BASE).
// - One thread (the back end's) uses it.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "iomm/vring_cache.hpp"
#include "vhost/address_space.hpp"
#include "vhost/blk_image.hpp"
#include "vhost/blk_request.hpp"
#include "vhost/desc_chain.hpp"
#include "vhost/iotlb.hpp"
#include "vhost/memory_table.hpp"
#include "vhost/protocol.hpp"
#include "vhost/unique_fd.hpp"

namespace iomm::vhost {

using Clock = std::chrono::steady_clock;
using LogFn = std::function<void(const std::string&)>;

struct QueueContext {
  const BlkImage* image = nullptr;
  const MemoryTable* table = nullptr;  // nullptr: no memory yet
  const Iotlb* iotlb = nullptr;        // non-null with VIRTIO_F_ACCESS_PLATFORM
  bool event_idx = false;
  bool indirect = false;
  std::chrono::milliseconds miss_timeout{2000};
  const LogFn* log = nullptr;
};

struct IotlbMissRequest {
  uint64_t iova = 0;
  uint8_t perm = kAccessRo;
};

struct QueueStats {
  uint64_t completed = 0;
  uint64_t errors = 0;  // completed with a status other than OK, or malformed
  uint64_t misses = 0;
  uint64_t notifications = 0;
  // The ring caches' figures, over every cache the queue has had.
  VringCacheStats ring;
};

class Virtqueue {
 public:
  explicit Virtqueue(uint16_t index) : index_(index) {}

  // vhost-user state changes. Each drops the ring view, so the next run
  // looks the rings up again, and clears a broken state.
  void set_num(uint16_t num);
  void set_addr(const VringAddr& addr);
  void set_base(uint16_t base);
  void set_kick(UniqueFd fd);
  void set_call(UniqueFd fd) { call_ = std::move(fd); }
  void set_err(UniqueFd fd) { err_ = std::move(fd); }
  void set_enabled(bool on) { enabled_ = on; }
  // GET_VRING_BASE: stop the ring and return the next available index.
  uint16_t stop();
  // The memory behind the rings changed (new table, IOTLB reset).
  void forget_ring() noexcept { drop_ring(); }
  // Everything back to the state of a new connection.
  void reset();

  [[nodiscard]] int kick_fd() const noexcept { return kick_.get(); }
  [[nodiscard]] bool runnable(const QueueContext& ctx) const noexcept;
  [[nodiscard]] bool stalled() const noexcept { return miss_deadline_.has_value(); }
  [[nodiscard]] std::optional<Clock::time_point> miss_deadline() const noexcept {
    return miss_deadline_;
  }
  [[nodiscard]] QueueStats stats() const noexcept;
  [[nodiscard]] uint16_t index() const noexcept { return index_; }

  // Drain the kick eventfd and process, unless stalled on a miss.
  std::optional<IotlbMissRequest> on_kick(const QueueContext& ctx);
  // An IOTLB update arrived, or the miss deadline passed: run again (after
  // the deadline, the request that still misses fails).
  std::optional<IotlbMissRequest> retry(const QueueContext& ctx, Clock::time_point now);
  std::optional<IotlbMissRequest> process(const QueueContext& ctx);

 private:
  void log(const QueueContext& ctx, const std::string& what) const;
  void brk(const QueueContext& ctx, const std::string& why);
  Status ensure_ring(const QueueContext& ctx);
  void drop_ring() noexcept;
  // A failed ring or buffer access: a miss to ask for, or a broken queue.
  // `fault` names the buffer range that failed, nullptr for a ring access
  // (the cache does not say which field: the first part of the rings the
  // IOTLB lacks is asked for).
  std::optional<IotlbMissRequest> access_failed(const QueueContext& ctx, const Status& s,
                                                const char* what, const AddressSpace::Fault* fault);
  // The first address of the rings the IOTLB does not hold (IOTLB mode).
  std::optional<IotlbMissRequest> ring_missing(const QueueContext& ctx) const;
  void notify(const QueueContext& ctx, uint16_t old_used);

  uint16_t index_;
  uint16_t num_ = 0;
  VringAddr addr_{};
  bool addr_set_ = false;
  uint16_t last_avail_ = 0;
  uint16_t used_idx_ = 0;
  UniqueFd kick_, call_, err_;
  bool enabled_ = false;
  bool started_ = false;
  bool broken_ = false;
  std::unique_ptr<VringCache> ring_;
  std::optional<Clock::time_point> miss_deadline_;
  bool fail_next_miss_ = false;  // the deadline passed: the next miss fails its request
  DescChain chain_;
  BlkScratch scratch_;
  QueueStats stats_;
};

}  // namespace iomm::vhost
