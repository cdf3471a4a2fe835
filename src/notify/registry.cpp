// Interval notifier registry (see notify/registry.hpp).
#include "notify/registry.hpp"

#include <new>

#include "core/check.hpp"
#include "fault/inject.hpp"

namespace iomm::notify {

Status Registry::add(Node& node) {
  std::unique_lock tree(tree_mu_);
  try {
    if (IOMM_INJECT("notify.alloc_node")) throw std::bad_alloc();
    node.registry = this;
    node.id = next_id_++;
    auto span = spans_.insert(node.range.last - node.range.start);
    try {
      if (IOMM_INJECT("notify.alloc_node")) throw std::bad_alloc();
      nodes_.insert(&node);
    } catch (const std::bad_alloc&) {
      spans_.erase(span);
      throw;
    }
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory for the notifier");
  }
  // Stamped after insertion, under tree_mu_: an invalidation that begins
  // later and reaches the node stamps it after us.
  std::lock_guard seq(seq_mu_);
  node.seq.store(seq_, std::memory_order_release);
  return {};
}

void Registry::remove(Node& node) noexcept {
  {
    std::unique_lock tree(tree_mu_);
    nodes_.erase(&node);
    spans_.erase(spans_.find(node.range.last - node.range.start));
  }
  // No delivery picks the node any more; wait for those that did.
  std::unique_lock lk(node.mu);
  node.idle.wait(lk, [&] { return node.busy == 0; });
}

bool Registry::empty() const {
  std::shared_lock tree(tree_mu_);
  return nodes_.empty();
}

uint64_t Registry::read_begin(const Node& node) {
  std::unique_lock lk(seq_mu_);
  uint64_t seq = node.seq.load(std::memory_order_acquire);
  // The stamp equals the (odd) registry sequence only while the window of
  // the invalidation that stamped it is open: wait for it to close.
  seq_done_.wait(lk, [&] {
    seq = node.seq.load(std::memory_order_acquire);
    return !invalidating(seq);
  });
  return seq;
}

std::optional<uint64_t> Registry::try_read_begin(const Node& node) {
  std::lock_guard lk(seq_mu_);
  const uint64_t seq = node.seq.load(std::memory_order_acquire);
  if (invalidating(seq)) return std::nullopt;
  return seq;
}

uint64_t Registry::begin() noexcept {
  std::lock_guard lk(seq_mu_);
  if (active_++ == 0) ++seq_;  // odd: invalidating
  return seq_;
}

void Registry::end() noexcept {
  {
    std::lock_guard lk(seq_mu_);
    IOMM_CHECK(active_ > 0, "notifier invalidation ended twice");
    if (--active_ == 0) ++seq_;  // even: no invalidation in progress
  }
  seq_done_.notify_all();
}

size_t Registry::pick(const IovaRange& r, uint64_t seq, bool resume, const Key& after, Node** out,
                      size_t max) noexcept {
  std::shared_lock tree(tree_mu_);
  if (nodes_.empty()) return 0;
  const uint64_t widest = *spans_.rbegin();
  const Key lowest{r.start > widest ? r.start - widest : 0, 0};
  // Resume after the last node of the previous batch. A node added behind
  // the cursor meanwhile was stamped with this event's (odd) sequence at
  // registration, so its first read_begin waits for the event to end.
  auto it = resume ? nodes_.upper_bound(after) : nodes_.lower_bound(lowest);
  size_t n = 0;
  for (; it != nodes_.end() && (*it)->range.start <= r.last && n < max; ++it) {
    Node* node = *it;
    if (node->range.last < r.start) continue;
    node->seq.store(seq, std::memory_order_release);
    std::lock_guard lk(node->mu);
    ++node->busy;
    out[n++] = node;
  }
  return n;
}

void Registry::deliver(uint64_t seq, const IovaRange& r, InvalidationCause cause) noexcept {
  // A fixed batch keeps delivery allocation-free; every non-blocking
  // callback of a batch runs before the batch's refusers are called again.
  constexpr size_t kBatch = 64;
  Node* batch[kBatch];
  bool refused[kBatch];
  Key cursor{0, 0};
  bool resume = false;
  for (;;) {
    const size_t n = pick(r, seq, resume, cursor, batch, kBatch);
    if (n == 0) return;
    resume = true;
    // Taken while every node of the batch is held: a node released below
    // may be removed and freed at once.
    cursor = ByStart::key(batch[n - 1]);
    // Each node is released as soon as its own callbacks are done, so
    // removing a notifier waits only for its own callback, never for
    // another's (which may wait for a lock the remover holds).
    const auto release = [](Node& node) noexcept {
      node.invalidations.fetch_add(1, std::memory_order_relaxed);
      std::lock_guard lk(node.mu);
      if (--node.busy == 0) node.idle.notify_all();
    };
    for (size_t i = 0; i < n; ++i) {
      Node& node = *batch[i];
      const Invalidation inv{
          {std::max(r.start, node.range.start), std::min(r.last, node.range.last)}, cause, false};
      refused[i] = !node.callback(*node.notifier, inv, seq);
      if (!refused[i]) release(node);
    }
    for (size_t i = 0; i < n; ++i) {
      if (!refused[i]) continue;
      Node& node = *batch[i];
      const Invalidation inv{
          {std::max(r.start, node.range.start), std::min(r.last, node.range.last)}, cause, true};
      IOMM_CHECK(node.callback(*node.notifier, inv, seq),
                 "a blocking invalidation callback returned false");
      release(node);
    }
  }
}

}  // namespace iomm::notify
