// The interval notifiers of one address space: an Ioas's IOVA space, or the
// byte offsets of one backing object (every source of the same file or the
// same user addresses shares them). See include/iomm/notifier.hpp for the
// contract consumers see.
//
// Sequence (mmu_interval_notifier's): the registry's `seq_` is odd while at
// least one invalidation of this space is between begin() and end(), even
// otherwise. deliver() stamps every notifier it reaches with that odd value
// before calling its callback; read_begin() waits while a notifier's stamp
// equals the current (odd) registry value, i.e. while an invalidation that
// reached it is still in progress; read_retry(seq) is "the stamp changed".
// A notifier registered during an invalidation gets the odd value, so its
// first read_begin waits for the invalidation to end (the kernel defers such
// an insertion to the last invalidate-end).
//
// Locks (docs/design.md, "Lock order"): tree_mu_ (notifiers by range) is
// held shared only to pick a batch of notifiers and exclusively only to add
// or remove one; seq_mu_ and a node's mu are leaves. No registry lock is
// held while a callback runs, so disjoint invalidations only share the
// brief tree_mu_ holds, and a callback may register or remove notifiers.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <optional>
#include <set>

#include "iomm/notifier.hpp"
#include "iomm/range.hpp"
#include "iomm/result.hpp"
#include "sync/ranked_mutex.hpp"

namespace iomm::notify {

class Registry;

// One registered notifier. Owned by NotifierState (or by an internal
// consumer); lives until Registry::remove has returned.
struct Node {
  Node(const IovaRange& r, InvalidateCallback cb) : range(r), callback(std::move(cb)) {}

  const IovaRange range;
  const InvalidateCallback callback;
  IntervalNotifier* notifier = nullptr;  // passed to the callback; set before add
  Registry* registry = nullptr;          // set by Registry::add
  uint64_t id = 0;                       // tie-breaker among equal starts; set by add

  // The last invalidation's sequence that reached this node (odd), or the
  // registry's even value at registration.
  std::atomic<uint64_t> seq{0};
  std::atomic<uint64_t> invalidations{0};

  // Deliveries holding this node (picked, callback not yet finished).
  sync::RankedMutex mu{sync::LockRank::notifier_node, "notify::Node::mu"};
  sync::CondVar idle;
  uint32_t busy = 0;  // guarded by mu
};

class Registry {
 public:
  Registry() = default;
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  // ENOMEM when the tree node cannot be allocated.
  Status add(Node& node);
  // Unregister; waits for a callback of the node running on another thread.
  // Never fails.
  void remove(Node& node) noexcept;

  [[nodiscard]] bool empty() const;

  // Waits while an invalidation that reached the node is in progress.
  uint64_t read_begin(const Node& node);
  // read_begin that does not wait: nullopt while such an invalidation is in
  // progress (for paths that must not sleep, e.g. a DMA miss).
  [[nodiscard]] std::optional<uint64_t> try_read_begin(const Node& node);

  // An invalidation of the space: begin() opens it and returns its sequence,
  // deliver() calls the callbacks of every notifier overlapping r (any number
  // of times, for disjoint pieces of one event), end() closes it once the
  // memory or translation is gone. Allocation-free, so unmap paths that
  // cannot fail may use it.
  uint64_t begin() noexcept;
  void deliver(uint64_t seq, const IovaRange& r, InvalidationCause cause) noexcept;
  void end() noexcept;

 private:
  // Nodes are ordered by (range.start, id).
  struct Key {
    uint64_t start;
    uint64_t id;
  };
  struct ByStart {
    using is_transparent = void;
    static Key key(const Node* n) noexcept { return {n->range.start, n->id}; }
    static Key key(const Key& k) noexcept { return k; }
    template <typename A, typename B>
    bool operator()(const A& a, const B& b) const noexcept {
      const Key x = key(a);
      const Key y = key(b);
      return x.start != y.start ? x.start < y.start : x.id < y.id;
    }
  };

  // Up to max nodes overlapping r that come after `after` (or from the
  // first when !resume), each stamped with seq and made busy.
  size_t pick(const IovaRange& r, uint64_t seq, bool resume, const Key& after, Node** out,
              size_t max) noexcept;

  mutable sync::RankedSharedMutex tree_mu_{sync::LockRank::notifier_tree,
                                           "notify::Registry::tree_mu_"};
  std::set<Node*, ByStart> nodes_;  // guarded by tree_mu_
  // Spans (last - start) of the nodes, for the overlap search: a node
  // overlapping r starts at or after r.start - the largest span.
  std::multiset<uint64_t> spans_;  // guarded by tree_mu_
  uint64_t next_id_ = 1;           // guarded by tree_mu_

  // Whether a node stamped `stamp` is reached by an invalidation in
  // progress. seq_mu_ held.
  [[nodiscard]] bool invalidating(uint64_t stamp) const noexcept {
    return (seq_ & 1) != 0 && stamp == seq_;
  }

  mutable sync::RankedMutex seq_mu_{sync::LockRank::notifier_seq, "notify::Registry::seq_mu_"};
  sync::CondVar seq_done_;
  uint64_t seq_ = 0;     // guarded by seq_mu_ (odd: invalidations active)
  uint32_t active_ = 0;  // guarded by seq_mu_
};

// One invalidation window of a registry: begin() at construction, end() at
// destruction; deliver() the event's ranges in between.
class Window {
 public:
  explicit Window(Registry& registry) noexcept : registry_(registry), seq_(registry.begin()) {}
  ~Window() { registry_.end(); }
  Window(const Window&) = delete;
  Window& operator=(const Window&) = delete;

  void deliver(const IovaRange& r, InvalidationCause cause) noexcept {
    registry_.deliver(seq_, r, cause);
  }

 private:
  Registry& registry_;
  const uint64_t seq_;
};

}  // namespace iomm::notify
