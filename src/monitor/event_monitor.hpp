// The monitor of memory that can vanish under the library: a thread that
// reads the userfaultfd non-cooperative events (UNMAP, REMOVE, REMAP) of the
// ranges of this process's memory watched, and the inotify IN_MODIFY events
// of the files watched that may shrink, and hands each to a sink as an
// invalidation of a range of a backing object (user addresses, or file
// offsets past the file's new end).
//
// The ranges are registered in UFFDIO_REGISTER_MODE_WP and nothing is ever
// write-protected, so no page fault is delivered to the monitor: only the
// events. When and what each event tells, and the windows, are in
// include/iomm/memory_monitor.hpp.
//
// Batch counts close the windows of the copy paths: the thread bumps
// `started` before it reads a batch of events (so before the kernel lets a
// REMOVE's zap proceed, and before a munmapping thread returns), and
// `finished` once the sink has run for every event of the batch. A copy
// calls settle() after it touched the memory: if a batch has started and
// not finished (it may have started before the copy and let a zap through
// during it), settle waits until its events have reached the sink, so the
// copier's notifier sequence, checked after settle, tells whether the copy
// raced with an event.
//
// Truncations are reported after the fact (inotify queues IN_MODIFY when
// the size has changed, and the truncating thread does not wait).
//
// Locking: mu_ (the registration counts, the file watches) is held around
// the register and unregister calls, and by the thread to look a file watch
// up; the sink runs with no lock held.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>

#include "iomm/notifier.hpp"
#include "iomm/result.hpp"
#include "mem/file_object.hpp"
#include "mem/interval_counts.hpp"
#include "sync/ranked_mutex.hpp"

struct uffd_msg;  // <linux/userfaultfd.h>

namespace iomm::monitor {

struct MemoryEvent {
  mem::MemObject* object;  // mem::user_object(), or a watched file
  uint64_t start;
  uint64_t last;  // inclusive
  InvalidationCause cause;
};

struct MonitorCounts {
  uint64_t batches;
  uint64_t unmaps;
  uint64_t removes;
  uint64_t remaps;
  uint64_t truncations;
};

class EventMonitor {
 public:
  using Sink = std::function<void(const MemoryEvent&)>;

  // Open a userfaultfd (UFFD_USER_MODE_ONLY where the plain one is refused)
  // asking for the three events and an inotify instance, and start the
  // thread. EPERM userfaultfd not allowed; ENOTSUP an event missing from
  // this kernel; ENOMEM; EMFILE.
  static Result<std::unique_ptr<EventMonitor>> start(Sink sink);
  // Stops the thread (events not read by then are dropped with the fd,
  // releasing any thread waiting for them); cannot fail.
  ~EventMonitor();
  EventMonitor(const EventMonitor&) = delete;
  EventMonitor& operator=(const EventMonitor&) = delete;

  // Register the pages covering [start, start + length) (counted: a range
  // watched twice needs two unwatches). EINVAL zero length, nothing mapped,
  // or memory that userfaultfd cannot watch (not anonymous, shmem or
  // hugetlb); EFAULT part of it not mapped; EBUSY registered with another
  // userfaultfd; EOVERFLOW wrap; ENOMEM.
  Status watch(uint64_t start, uint64_t length);
  // Drop one watch() of the same range; unregisters pages no watch covers.
  // Cannot fail (memory already unmapped needs no unregistering).
  void unwatch(uint64_t start, uint64_t length) noexcept;

  // Report truncations of the file (counted per file). ENOMEM, ENOSPC
  // (inotify watch limit).
  Status watch_file(const std::shared_ptr<mem::FileObject>& file);
  void unwatch_file(const mem::FileObject& file) noexcept;

  // Batches started so far.
  [[nodiscard]] uint64_t started() const noexcept {
    return started_.load(std::memory_order_seq_cst);
  }
  // See above: returns once every batch started by now has reached the
  // sink. Two loads when no batch is running. EDEADLK when called from the
  // monitor thread (a sink or a callback it runs), which would wait for
  // itself.
  [[nodiscard]] Status settle() const;

  [[nodiscard]] MonitorCounts counts() const noexcept;
  // Whether the userfaultfd had to be opened with UFFD_USER_MODE_ONLY.
  [[nodiscard]] bool user_mode_only() const noexcept { return user_mode_only_; }

 private:
  struct FileWatch {
    std::shared_ptr<mem::FileObject> file;
    uint64_t size;  // as last seen: a smaller size is a truncation
    uint32_t count;
  };

  EventMonitor(int uffd, int inotify_fd, int stop_fd, bool user_mode_only, Sink sink);
  void run() noexcept;
  void deliver(const ::uffd_msg& msg) noexcept;
  void file_changed(int wd) noexcept;
  // UFFDIO_UNREGISTER the zero-count segments of [first, last]. mu_ held.
  void unregister_unwatched(uint64_t first, uint64_t last) noexcept;

  const int uffd_;
  const int inotify_fd_;
  const int stop_fd_;  // an eventfd: written once by the destructor
  const bool user_mode_only_;
  const Sink sink_;

  sync::RankedMutex mu_{sync::LockRank::monitor_watches, "monitor::EventMonitor::mu_"};
  mem::IntervalCounts registered_;  // mu_; page index -> watches
  std::map<int, FileWatch> files_;  // mu_; by inotify watch descriptor
  const std::shared_ptr<mem::MemObject> user_;

  std::atomic<uint64_t> started_{0};
  std::atomic<uint64_t> finished_{0};
  std::atomic<uint64_t> batches_{0};
  std::atomic<uint64_t> unmaps_{0};
  std::atomic<uint64_t> removes_{0};
  std::atomic<uint64_t> remaps_{0};
  std::atomic<uint64_t> truncations_{0};
  std::thread thread_;  // last: starts after everything it reads
};

}  // namespace iomm::monitor
