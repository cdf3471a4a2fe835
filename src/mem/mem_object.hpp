// Backing objects: the identity space that pages belong to.
//
// Each kind of backing has its own type behind this small interface: a file
// mapped once by the library (FileObject), this process's virtual memory
// (UserObject, one per process), and synthetic memory (SimulatedObject).
// Pins are counted per object and page in the object's PinStore, so any number
// of mappings, domains, accesses and copies reaching one page pin it once and
// charge it once per owner.
#pragma once

#include <array>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>

#include "iomm/range.hpp"
#include "iomm/result.hpp"
#include "iomm/source.hpp"
#include "mem/host_access.hpp"
#include "mem/interval_counts.hpp"
#include "mem/page_counts.hpp"
#include "notify/registry.hpp"
#include "sync/ranked_mutex.hpp"

namespace iomm::acct {
class Owner;
}

namespace iomm::mem {

class MemObject {
 public:
  MemObject(SourceKind kind, unsigned page_shift) : kind_(kind), page_shift_(page_shift) {}
  virtual ~MemObject() = default;
  MemObject(const MemObject&) = delete;
  MemObject& operator=(const MemObject&) = delete;

  [[nodiscard]] SourceKind kind() const noexcept { return kind_; }
  // log2 of the pin granule: 12, or the hugetlb page shift.
  [[nodiscard]] unsigned page_shift() const noexcept { return page_shift_; }
  [[nodiscard]] bool synthetic() const noexcept { return kind_ == SourceKind::simulated; }

  // The address a page table maps for byte `offset` of the object: a host
  // virtual address, or a synthetic address for simulated memory.
  [[nodiscard]] virtual uint64_t dma_address(uint64_t offset) const noexcept = 0;
  // Host pointer for byte `offset`, or nullptr when there is no memory.
  // Where there is memory it is contiguous: host(offset + n) is host(offset)
  // + n, so a run of pages needs one call.
  [[nodiscard]] virtual void* host(uint64_t offset) const noexcept = 0;
  // How a domain's DMA reaches host(): see mem/host_access.hpp.
  [[nodiscard]] virtual HostAccess host_access() const noexcept { return HostAccess::direct; }
  [[nodiscard]] virtual bool shrink_sealed() const noexcept { return true; }
  // Whether pins charge their owner. Device memory is not, as type1 never
  // charges MMIO.
  [[nodiscard]] virtual bool charged() const noexcept { return true; }
  // Whether [offset, offset + length) is there to be reached without a pin
  // (on-demand mappings): mapped user memory, or a file at least that long.
  // A probe with no side effect; false on doubt.
  [[nodiscard]] virtual bool present(uint64_t offset, uint64_t length) const noexcept = 0;

  // Copy between buf and [offset, offset + n) of the object, for accesses'
  // read and write (no pin needed). False if the memory is not there (a
  // shrunk file, unmapped or read-only user memory): EFAULT to the caller,
  // never a crash. The destination may then be partly written.
  virtual bool copy_out(uint64_t offset, void* buf, size_t n) const noexcept = 0;
  virtual bool copy_in(uint64_t offset, const void* buf, size_t n) const noexcept = 0;

  // Pin [offset, offset + length) for owner (nullptr: uncharged). Pages are
  // charged to the owner before they are locked; the call is all-or-nothing.
  // EFAULT bad address, ENOMEM memlock limit or no memory.
  Status pin(acct::Owner* owner, uint64_t offset, uint64_t length, bool write);
  // Drop one pin taken by pin() with the same arguments. Never fails.
  void unpin(acct::Owner* owner, uint64_t offset, uint64_t length) noexcept;

  // Per-page pins (an access's pin_pages): like pin(), but counted per 4 KiB
  // page in PageCounts instead of as a segment, so that any 4 KiB page of
  // the range can later be dropped on its own by unpin_pages() with no
  // allocation, and a page pinned alone costs a bit, not a segment. A
  // granule is locked while its segment count or its page count is
  // non-zero, and charged to an owner while either of that owner's counts
  // is. Same errors as pin().
  Status pin_pages(acct::Owner* owner, uint64_t offset, uint64_t length, bool write);
  // Drop pages pinned by pin_pages() (any page-aligned part of them, in any
  // grouping). Never fails, never allocates.
  void unpin_pages(acct::Owner* owner, uint64_t offset, uint64_t length) noexcept;

  // Interval notifiers over this object's offsets (IntervalNotifier::
  // watch_source from any source of it; notify::invalidate_source).
  [[nodiscard]] notify::Registry& notifiers() const noexcept { return notifiers_; }

 protected:
  // Make granules [first, last] resident and locked. Called without the pin
  // lock, at most once at a time for any given granule.
  virtual Status lock_granules(uint64_t first, uint64_t last, bool write) = 0;
  virtual void unlock_granules(uint64_t first, uint64_t last) noexcept = 0;
  // A write pin of granules [first, last], all held (locked) already: fail
  // (EFAULT) where they cannot be written, as lock_granules would for a
  // first pin, since a pin for read does not say they can. Called without
  // the pin lock. Memory whose writability is the source's (files) or
  // nobody's concern (simulated) has nothing to check.
  virtual Status confirm_writable(uint64_t /*first*/, uint64_t /*last*/) { return {}; }

 private:
  struct Range {
    uint64_t first;
    uint64_t last;
  };
  // Append granules [lo, hi] to runs[0, n), merged into the last run when
  // they follow it; false when runs is full (a caller resumes at lo in its
  // next batch).
  static bool append_run(std::span<Range> runs, size_t& n, uint64_t lo, uint64_t hi) noexcept {
    if (n > 0 && runs[n - 1].last + 1 == lo) {
      runs[n - 1].last = hi;
      return true;
    }
    if (n == runs.size()) return false;
    runs[n++] = {lo, hi};
    return true;
  }
  // The granules [first, last] of a pin_pages/unpin_pages call, and who pays
  // for them (nullptr when the object is not charged).
  struct PageCall {
    uint64_t first;
    uint64_t last;
    acct::Owner* payer;
  };
  // Enter such a call of [offset, offset + length): take mu_ into lk and
  // wait until no other call works on its granules (a segment pin's
  // pending run, another page call's op).
  PageCall begin_page_call(acct::Owner* owner, uint64_t offset, uint64_t length,
                           std::unique_lock<sync::RankedMutex>& lk) noexcept;
  [[nodiscard]] uint64_t granule_pages() const noexcept {
    return uint64_t{1} << (page_shift_ - kPageShift);
  }
  // Call f(lo, hi, pages) for the spans of granules [from, to] (inside the
  // range of a page call of [offset, offset + length)) whose granules each
  // hold the same number of the call's pages: only its first and last
  // granule can hold fewer than a whole granule. In order, while f returns
  // true; returns false if f did.
  template <typename F>
  bool each_span(uint64_t from, uint64_t to, uint64_t offset, uint64_t length, F&& f) const;
  // A pin_pages/unpin_pages call doing syscalls without mu_ on granules
  // [first, last]: other calls touching them wait. Lives on the caller's
  // stack, so unpin_pages needs no allocation to register it.
  struct PageOp {
    uint64_t first;
    uint64_t last;
    PageOp* next;
  };
  // Runs are handled in fixed batches so unpin never allocates.
  static constexpr size_t kRunBatch = 32;
  // The locking pass of pin() and pin_pages(): lock_granules() on each run
  // collect(cursor, runs) finds in [cursor, last], a batch at a time, with
  // lk (held on entry and exit) released around the system calls. Stops at
  // the first failure and sets *failed_at to the first granule of the run
  // that failed (the granules before it are locked).
  template <typename Collect>
  Status lock_runs(uint64_t first, uint64_t last, bool write,
                   std::unique_lock<sync::RankedMutex>& lk, uint64_t* failed_at, Collect collect);
  size_t collect_runs(uint64_t op, uint64_t first, uint64_t last,
                      std::span<Range> runs) const noexcept;
  // Runs in [from, last] of granules with no segment count whose page count
  // is what pin_pages(offset, length) just raised it to (raised) or zero.
  size_t collect_page_runs(uint64_t from, uint64_t last, uint64_t offset, uint64_t length,
                           bool raised, std::span<Range> runs) const noexcept;
  // Granules in [first, last] with a page count in pages, among the
  // segments of counts (covering the range) whose count is `count`.
  static uint64_t paged_where(const IntervalCounts& counts, const PageCounts* pages, uint64_t first,
                              uint64_t last, uint64_t count) noexcept;
  [[nodiscard]] bool page_op_overlaps(uint64_t first, uint64_t last) const noexcept;
  void finish_page_unlock(uint64_t first, uint64_t last, uint64_t offset, uint64_t length,
                          std::unique_lock<sync::RankedMutex>& lk) noexcept;
  [[nodiscard]] uint32_t pages_in(uint64_t granule, uint64_t offset,
                                  uint64_t length) const noexcept;
  void finish_unlock(uint64_t op, uint64_t first, uint64_t last,
                     std::unique_lock<sync::RankedMutex>& lk) noexcept;
  void account_physical(uint64_t granules, bool pinned) const noexcept;

  const SourceKind kind_;
  const unsigned page_shift_;

  sync::RankedMutex mu_{sync::LockRank::pin_store, "MemObject::mu_"};
  sync::CondVar unpended_;
  uint64_t next_op_ = 1;
  IntervalCounts physical_;
  std::map<acct::Owner*, IntervalCounts> charged_;
  // Page counts (pin_pages) per granule, in 4 KiB pages: physical, and per
  // owner for charges.
  PageCounts paged_;
  std::map<acct::Owner*, PageCounts> paged_charged_;
  PageOp* page_ops_ = nullptr;
  mutable notify::Registry notifiers_;
};

template <typename Collect>
Status MemObject::lock_runs(uint64_t first, uint64_t last, bool write,
                            std::unique_lock<sync::RankedMutex>& lk, uint64_t* failed_at,
                            Collect collect) {
  Status result;
  for (uint64_t cursor = first; result && cursor <= last;) {
    std::array<Range, kRunBatch> runs{};
    const size_t n = collect(cursor, std::span<Range>(runs));
    if (n == 0) break;
    lk.unlock();
    for (size_t i = 0; i < n && result; ++i) {
      result = lock_granules(runs[i].first, runs[i].last, write);
      if (!result) *failed_at = runs[i].first;
    }
    lk.lock();
    cursor = runs[n - 1].last + 1;
  }
  return result;
}

// The object for this process's virtual memory (page identity = address).
std::shared_ptr<MemObject> user_object();

// Process-wide pin counters (bytes, 4 KiB units).
struct PinCounters {
  uint64_t pinned_bytes;
  uint64_t simulated_pinned_bytes;
};
PinCounters pin_counters() noexcept;

// Map a populate/mlock errno to the errno the API reports.
int pin_errno(int syscall_errno) noexcept;

}  // namespace iomm::mem
