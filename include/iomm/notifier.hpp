// Interval notifiers: invalidation instead of long-term pins (seed 002;
// the kernel's mmu_interval_notifier).
//
// A consumer that caches direct pointers to memory (ring metadata, a
// translation, a device's view of a buffer) registers a notifier over the
// range it caches, and is told before the range's memory or translation
// goes away. It does not pin and is not charged.
//
// Contract
// - Ownership: a notifier is a unique_ptr owned by the consumer. It keeps
//   what it watches alive (the Ioas, or the source's backing object).
//   Destroying it unregisters it and waits for a callback of it that is
//   running on another thread; it cannot fail. Do not destroy a notifier
//   from its own callback.
// - Ranges: an IOVA range of an Ioas (watch_iova), or the byte range of a
//   MemorySource (watch_source: the offsets of its backing object, so every
//   source of the same file or the same user addresses sees the same
//   events). Inclusive `last`; the whole 64-bit space is expressible.
// - Sequence protocol, as mmu_interval_read_begin / read_retry:
//
//     for (;;) {
//       uint64_t seq = n->read_begin();   // waits out a running invalidation
//       ... look the memory up (Ioas::host_segments) ...
//       std::lock_guard lock(my_mu);
//       if (n->read_retry(seq)) continue; // invalidated meanwhile: look again
//       ... publish the pointers ...
//       break;
//     }
//
//   and the callback, under the same consumer lock, calls set_seq(seq)
//   and stops using the pointers before it returns true. read_begin waits
//   while an invalidation of this notifier is between its start (the
//   callbacks) and its end (the memory or translation is gone); the wait is
//   bounded by that invalidation, which never waits for read_begin.
// - Callbacks run on the invalidating thread (an unmapping thread, the
//   userfaultfd monitor thread, a truncating or revoking thread) with no
//   iomm lock held that the data path takes: a callback may call read-only
//   iomm entry points (translate, host_segments, Access::read) but not map
//   or unmap.
// - Modes: every invalidation first calls callbacks with blocking == false.
//   Such a callback must not sleep (no mutex a data-path thread may hold,
//   no grace period); if it cannot finish without sleeping it returns false
//   (the kernel's EAGAIN), and once every non-blocking callback has run the
//   invalidation calls the refusers again with blocking == true, in which
//   they may sleep and must return true. A blocking callback that returns
//   false is a bug and aborts (IOMM_CHECK).
// - Events (Invalidation::cause): an Ioas unmap of the range (`unmap`), a
//   live-update invalidation (`host_invalidate`, Ioas::invalidate_host),
//   this process's memory unmapped, discarded or moved (`munmap`,
//   `discard`, `remap`, reported by the userfaultfd monitor; see
//   iomm/memory_monitor.hpp for which of them arrive after the fact), a
//   backing file truncated (`truncate`), device memory revoked (`revoke`).
//   An `unmap` is delivered before any translation of the range is removed,
//   and again each round an unmap repeats while accesses still hold pins
//   there (include/iomm/access.hpp: accesses are notifiers too); an unmap
//   that then fails (EDEADLOCK) leaves the range mapped, so for notifiers it
//   was a spurious invalidation.
//
// Errors (from the factories)
// - EINVAL    no callback, or start > last.
// - EOVERFLOW start + length wraps (watch_source).
// - ENOMEM    allocation failed.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

#include "iomm/export.hpp"
#include "iomm/range.hpp"
#include "iomm/result.hpp"

namespace iomm {

class Ioas;
class MemorySource;

namespace notify {
struct NotifierState;
}

enum class InvalidationCause : uint8_t {
  unmap,
  host_invalidate,
  munmap,
  discard,
  remap,
  truncate,
  revoke,
};

IOMM_API const char* to_string(InvalidationCause cause) noexcept;

struct Invalidation {
  // The part of the event's range that overlaps the notifier, in the
  // notifier's own address space (IOVA, or source-backing offsets).
  IovaRange range;
  InvalidationCause cause = InvalidationCause::unmap;
  bool blocking = false;
};

class IntervalNotifier;

// Return true when done; false only when !inv.blocking, to be called again
// with blocking == true. `seq` is the value to pass to set_seq().
using InvalidateCallback =
    std::function<bool(IntervalNotifier& notifier, const Invalidation& inv, uint64_t seq)>;

class IOMM_API IntervalNotifier {
 public:
  static Result<std::unique_ptr<IntervalNotifier>> watch_iova(const std::shared_ptr<Ioas>& ioas,
                                                              const IovaRange& range,
                                                              InvalidateCallback callback);
  static Result<std::unique_ptr<IntervalNotifier>> watch_source(const MemorySource& source,
                                                                InvalidateCallback callback);
  ~IntervalNotifier();
  IntervalNotifier(const IntervalNotifier&) = delete;
  IntervalNotifier& operator=(const IntervalNotifier&) = delete;

  // Begin a read: waits while an invalidation of this notifier is in
  // progress, then returns the current sequence.
  uint64_t read_begin();
  // True if an invalidation started since read_begin returned seq.
  [[nodiscard]] bool read_retry(uint64_t seq) const noexcept;
  // From the callback, under the consumer's lock: record the invalidation's
  // sequence, so a read_retry of an older seq answers true.
  void set_seq(uint64_t seq) noexcept;

  [[nodiscard]] const IovaRange& range() const noexcept;
  // Invalidations delivered so far (for tests and statistics).
  [[nodiscard]] uint64_t invalidations() const noexcept;

  // Internal.
  notify::NotifierState& state() noexcept { return *state_; }

 private:
  explicit IntervalNotifier(std::unique_ptr<notify::NotifierState> state);
  std::unique_ptr<notify::NotifierState> state_;
};

}  // namespace iomm
