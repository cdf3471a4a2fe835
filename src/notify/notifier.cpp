// Interval notifiers (see include/iomm/notifier.hpp for the contract).
#include "iomm/notifier.hpp"

#include <new>

#include "fault/inject.hpp"
#include "ioas/ioas_state.hpp"
#include "notify/invalidate.hpp"
#include "notify/notifier_state.hpp"

namespace iomm {

const char* to_string(InvalidationCause cause) noexcept {
  switch (cause) {
    case InvalidationCause::unmap:
      return "unmap";
    case InvalidationCause::host_invalidate:
      return "host_invalidate";
    case InvalidationCause::munmap:
      return "munmap";
    case InvalidationCause::discard:
      return "discard";
    case InvalidationCause::remap:
      return "remap";
    case InvalidationCause::truncate:
      return "truncate";
    case InvalidationCause::revoke:
      return "revoke";
  }
  return "unknown";
}

namespace {

Result<std::unique_ptr<notify::NotifierState>> make_state(const IovaRange& range,
                                                          InvalidateCallback callback) {
  if (!callback) return Error(EINVAL, "an invalidation callback is mandatory");
  if (range.start > range.last) return Error(EINVAL, "range start is above its last byte");
  std::unique_ptr<notify::NotifierState> state;
  if (!IOMM_INJECT("notify.alloc_state")) {
    state.reset(new (std::nothrow) notify::NotifierState(range, std::move(callback)));
  }
  if (!state) return Error(ENOMEM, "out of memory for the notifier");
  return state;
}

}  // namespace

IntervalNotifier::IntervalNotifier(std::unique_ptr<notify::NotifierState> state)
    : state_(std::move(state)) {}

Result<std::unique_ptr<IntervalNotifier>> IntervalNotifier::watch_iova(
    const std::shared_ptr<Ioas>& ioas, const IovaRange& range, InvalidateCallback callback) {
  if (!ioas) return Error(EINVAL, "no IOAS");
  auto state = make_state(range, std::move(callback));
  if (!state.ok()) return state.error();
  std::unique_ptr<IntervalNotifier> n(new (std::nothrow) IntervalNotifier(std::move(*state)));
  if (!n) return Error(ENOMEM, "out of memory for the notifier");
  n->state_->node.notifier = n.get();
  n->state_->ioas = ioas;
  if (Status s = ioas::state_of(*ioas).notifiers.add(n->state_->node); !s) {
    n->state_->node.registry = nullptr;
    return s.error();
  }
  return n;
}

Result<std::unique_ptr<IntervalNotifier>> IntervalNotifier::watch_source(
    const MemorySource& source, InvalidateCallback callback) {
  const auto range = make_range(source.offset(), source.length());
  if (!range) return Error(EOVERFLOW, "source offset + length wraps");
  auto state = make_state(*range, std::move(callback));
  if (!state.ok()) return state.error();
  std::unique_ptr<IntervalNotifier> n(new (std::nothrow) IntervalNotifier(std::move(*state)));
  if (!n) return Error(ENOMEM, "out of memory for the notifier");
  n->state_->node.notifier = n.get();
  n->state_->object = source.object();
  if (Status s = source.object()->notifiers().add(n->state_->node); !s) {
    n->state_->node.registry = nullptr;
    return s.error();
  }
  return n;
}

IntervalNotifier::~IntervalNotifier() {
  if (state_->node.registry != nullptr) state_->node.registry->remove(state_->node);
}

uint64_t IntervalNotifier::read_begin() { return state_->node.registry->read_begin(state_->node); }

bool IntervalNotifier::read_retry(uint64_t seq) const noexcept {
  return state_->node.seq.load(std::memory_order_acquire) != seq;
}

void IntervalNotifier::set_seq(uint64_t seq) noexcept {
  // The invalidation stamped the notifier with seq before calling back; the
  // store keeps the documented protocol (and its ordering under the
  // consumer's lock) without relying on that.
  state_->node.seq.store(seq, std::memory_order_release);
}

const IovaRange& IntervalNotifier::range() const noexcept { return state_->node.range; }

uint64_t IntervalNotifier::invalidations() const noexcept {
  return state_->node.invalidations.load(std::memory_order_relaxed);
}

namespace notify {

void invalidate_source(mem::MemObject& object, const IovaRange& offsets,
                       InvalidationCause cause) noexcept {
  Window window(object.notifiers());
  window.deliver(offsets, cause);
}

SourceInvalidation::SourceInvalidation(mem::MemObject& object, const IovaRange& offsets,
                                       InvalidationCause cause) noexcept
    : window_(object.notifiers()) {
  window_.deliver(offsets, cause);
}

}  // namespace notify

}  // namespace iomm
