#include "vhost/virtqueue.hpp"

#include <sys/eventfd.h>
#include <unistd.h>

#include "vhost/blk_request.hpp"

namespace iomm::vhost {

namespace {

// virtio 1.x 2.7.10: notify when new_idx has passed event since old_idx.
bool need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx) {
  return static_cast<uint16_t>(new_idx - event - 1) < static_cast<uint16_t>(new_idx - old_idx);
}

void add_ring_stats(VringCacheStats& to, const VringCacheStats& r) noexcept {
  to.cached_batches += r.cached_batches;
  to.uncached_batches += r.uncached_batches;
  to.slow_accesses += r.slow_accesses;
  to.invalidations += r.invalidations;
  to.revalidations += r.revalidations;
  to.refusals += r.refusals;
}

}  // namespace

void Virtqueue::set_num(uint16_t num) {
  num_ = num;
  drop_ring();
  broken_ = false;
}

void Virtqueue::set_addr(const VringAddr& addr) {
  addr_ = addr;
  addr_set_ = true;
  drop_ring();
  broken_ = false;
}

void Virtqueue::set_base(uint16_t base) {
  // After a stop every request was completed, so the used index the driver
  // sees equals the available index the front end saved.
  last_avail_ = base;
  used_idx_ = base;
  broken_ = false;
}

void Virtqueue::set_kick(UniqueFd fd) {
  kick_ = std::move(fd);
  started_ = kick_.valid();
}

uint16_t Virtqueue::stop() {
  started_ = false;
  kick_.reset();
  drop_ring();
  miss_deadline_.reset();
  fail_next_miss_ = false;
  return last_avail_;
}

void Virtqueue::reset() {
  stop();
  call_.reset();
  err_.reset();
  num_ = 0;
  addr_ = {};
  addr_set_ = false;
  last_avail_ = used_idx_ = 0;
  enabled_ = false;
  broken_ = false;
}

bool Virtqueue::runnable(const QueueContext& ctx) const noexcept {
  return started_ && enabled_ && addr_set_ && num_ != 0 && !broken_ && ctx.table != nullptr;
}

void Virtqueue::log(const QueueContext& ctx, const std::string& what) const {
  if (ctx.log != nullptr && *ctx.log) (*ctx.log)("queue " + std::to_string(index_) + ": " + what);
}

void Virtqueue::brk(const QueueContext& ctx, const std::string& why) {
  log(ctx, "stopped processing: " + why);
  broken_ = true;
  drop_ring();
  miss_deadline_.reset();
}

void Virtqueue::drop_ring() noexcept {
  if (!ring_) return;
  add_ring_stats(stats_.ring, ring_->stats());
  ring_.reset();
}

QueueStats Virtqueue::stats() const noexcept {
  QueueStats s = stats_;
  if (ring_) add_ring_stats(s.ring, ring_->stats());
  return s;
}

Status Virtqueue::ensure_ring(const QueueContext& ctx) {
  if (ring_) return {};
  VringLayout layout;
  layout.size = num_;
  layout.event_idx = ctx.event_idx;
  const AddressSpace* space = nullptr;
  if (ctx.iotlb != nullptr) {
    layout.desc_iova = addr_.desc;
    layout.avail_iova = addr_.avail;
    layout.used_iova = addr_.used;
    space = &ctx.iotlb->space();
  } else {
    // Without ACCESS_PLATFORM the ring addresses are the front end's
    // virtual addresses; the descriptors carry guest-physical ones.
    auto desc = ctx.table->uaddr_to_gpa(addr_.desc);
    auto avail = ctx.table->uaddr_to_gpa(addr_.avail);
    auto used = ctx.table->uaddr_to_gpa(addr_.used);
    if (!desc || !avail || !used) return Error(EFAULT, "ring addresses outside guest memory");
    layout.desc_iova = *desc;
    layout.avail_iova = *avail;
    layout.used_iova = *used;
    space = &ctx.table->gpa_space();
  }
  auto ring = VringCache::create(space->ioas_ptr(), layout);
  if (!ring) return std::move(ring).error();
  ring_ = std::move(*ring);
  return {};
}

std::optional<IotlbMissRequest> Virtqueue::ring_missing(const QueueContext& ctx) const {
  const VringLayout& l = ring_->layout();
  const uint64_t event = l.event_idx ? 2 : 0;
  // The cache maps the used ring read-write (it reads used_idx too).
  const struct {
    uint64_t addr, length;
    uint8_t perm;
  } rings[3] = {
      {l.desc_iova, 16ULL * l.size, kAccessRo},
      {l.avail_iova, 4 + 2ULL * l.size + event, kAccessRo},
      {l.used_iova, 4 + 8ULL * l.size + event, kAccessRw},
  };
  for (const auto& r : rings) {
    if (auto at = ctx.iotlb->first_missing(r.addr, r.length, r.perm))
      return IotlbMissRequest{*at, r.perm};
  }
  return std::nullopt;
}

std::optional<IotlbMissRequest> Virtqueue::access_failed(const QueueContext& ctx, const Status& s,
                                                         const char* what,
                                                         const AddressSpace::Fault* fault) {
  if ((s.code() == ENOENT || s.code() == EPERM) && ctx.iotlb != nullptr && !fail_next_miss_) {
    // The rings first: a chain's error may be the descriptor table's, and
    // whatever failed, the rings are needed to go on.
    std::optional<IotlbMissRequest> missing = ring_missing(ctx);
    if (!missing && fault != nullptr) {
      const uint8_t perm = fault->write ? kAccessWo : kAccessRo;
      if (auto at = ctx.iotlb->first_missing(fault->addr, fault->length, perm))
        missing = IotlbMissRequest{*at, perm};
    }
    if (missing) {
      if (!miss_deadline_) miss_deadline_ = Clock::now() + ctx.miss_timeout;
      ++stats_.misses;
      return missing;
    }
  }
  brk(ctx, std::string(what) + ": " + s.error().describe());
  return std::nullopt;
}

std::optional<IotlbMissRequest> Virtqueue::on_kick(const QueueContext& ctx) {
  uint64_t count = 0;
  // A kick fd is an eventfd; a failed read means nothing was pending.
  if (kick_.valid()) (void)!::read(kick_.get(), &count, sizeof(count));
  if (stalled()) return std::nullopt;
  return process(ctx);
}

std::optional<IotlbMissRequest> Virtqueue::retry(const QueueContext& ctx, Clock::time_point now) {
  if (!stalled()) return std::nullopt;
  if (now >= *miss_deadline_) {
    log(ctx, "IOTLB miss not answered in time: failing the request");
    fail_next_miss_ = true;
    miss_deadline_.reset();
  }
  // An update that does not answer the miss keeps the deadline: a front end
  // sending unrelated updates cannot hold the request forever.
  return process(ctx);
}

std::optional<IotlbMissRequest> Virtqueue::process(const QueueContext& ctx) {
  if (!runnable(ctx)) return std::nullopt;
  if (Status s = ensure_ring(ctx); !s) {
    brk(ctx, "rings unusable: " + s.error().describe());
    return std::nullopt;
  }
  VringCache& ring = *ring_;
  const uint16_t old_used = used_idx_;
  const AddressSpace& space = ctx.iotlb != nullptr ? ctx.iotlb->space() : ctx.table->gpa_space();
  std::optional<IotlbMissRequest> miss;
  for (;;) {
    auto avail = ring.avail_idx();
    if (!avail) {
      miss = access_failed(ctx, avail.error(), "reading the available index", nullptr);
      break;
    }
    if (static_cast<uint16_t>(*avail - last_avail_) > num_) {
      brk(ctx, "available index " + std::to_string(*avail) +
                   " is more than the queue size ahead of " + std::to_string(last_avail_));
      break;
    }
    if (*avail == last_avail_) {
      if (!ctx.event_idx) break;
      if (Status s = ring.set_avail_event(last_avail_); !s) {
        miss = access_failed(ctx, s, "writing avail_event", nullptr);
        break;
      }
      auto again = ring.avail_idx();
      if (again && *again == last_avail_) break;
      continue;
    }
    bool stop = false;
    while (last_avail_ != *avail) {
      auto head = ring.avail_entry(last_avail_);
      if (!head) {
        miss = access_failed(ctx, head.error(), "reading the available ring", nullptr);
        stop = true;
        break;
      }
      if (*head >= num_) {
        brk(ctx, "available ring names descriptor " + std::to_string(*head) + " of a queue of " +
                     std::to_string(num_));
        stop = true;
        break;
      }
      uint32_t used_len = 0;
      const bool retry_on_miss = ctx.iotlb != nullptr && !fail_next_miss_;
      if (Status s = read_chain(ring, space, *head, ctx.indirect, chain_); !s) {
        if (s.code() == ENOENT && retry_on_miss) {
          miss = access_failed(ctx, s, "reading a descriptor", &space.last_fault());
          stop = true;
          break;
        }
        log(ctx, "descriptor chain at head " + std::to_string(*head) +
                     " refused: " + s.error().describe());
        ++stats_.errors;
      } else {
        auto done = execute_blk_request(*ctx.image, space, chain_, retry_on_miss, scratch_);
        if (!done) {
          miss = access_failed(ctx, done.error(), "a request buffer", &space.last_fault());
          stop = true;
          break;
        }
        if (!done->problem.empty()) {
          log(ctx, "request at head " + std::to_string(*head) + ": " + done->problem);
          ++stats_.errors;
        }
        used_len = done->used_len;
      }
      fail_next_miss_ = false;
      if (Status s = ring.set_used_entry(used_idx_, *head, used_len); !s) {
        miss = access_failed(ctx, s, "writing the used ring", nullptr);
        stop = true;
        break;
      }
      if (Status s = ring.set_used_idx(static_cast<uint16_t>(used_idx_ + 1)); !s) {
        miss = access_failed(ctx, s, "writing the used index", nullptr);
        stop = true;
        break;
      }
      ++used_idx_;
      ++last_avail_;
      ++stats_.completed;
      miss_deadline_.reset();  // progress: a later miss gets a full wait
    }
    if (stop) break;
  }
  if (used_idx_ != old_used && ring_) notify(ctx, old_used);
  if (!miss) miss_deadline_.reset();
  return miss;
}

void Virtqueue::notify(const QueueContext& ctx, uint16_t old_used) {
  bool wanted = true;
  if (ctx.event_idx) {
    auto event = ring_->used_event();
    wanted = !event || need_event(*event, used_idx_, old_used);
  } else {
    auto flags = ring_->avail_flags();
    wanted = !flags || (*flags & kVringAvailFNoInterrupt) == 0;
  }
  if (!wanted || !call_.valid()) return;
  ++stats_.notifications;
  // An eventfd write fails only if the counter would overflow; the driver
  // is then already signalled.
  (void)!::eventfd_write(call_.get(), 1);
}

}  // namespace iomm::vhost
