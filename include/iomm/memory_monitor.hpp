// The memory monitor: this process's memory, and files that may shrink,
// watched for the events that make a cached pointer or translation stale,
// each turned into an invalidation of the IntervalNotifiers watching the
// memory's source (iomm/notifier.hpp, watch_source).
//
// Contract
// - Ownership: a MemoryWatch is a unique_ptr owned by the consumer; while
//   it lives its source is watched. Destroying it cannot fail. Watches are
//   counted: overlapping watches keep the overlap watched until the last
//   goes. The monitor itself (one thread, one userfaultfd, one inotify
//   instance) starts with the first watch and runs until the process exits.
// - Order: register the IntervalNotifier first, then the watch: an event
//   between the two would reach no notifier.
// - User memory (MemorySource::from_user): its pages are registered with a
//   userfaultfd in write-protect mode with nothing write-protected, so no
//   page fault ever waits for the library and the memory behaves as before;
//   only the non-cooperative events are read. Anonymous private memory,
//   shared anonymous memory, memfd and shmem mappings and hugetlb mappings
//   can be watched. Works unprivileged: where vm.unprivileged_userfaultfd is
//   0 the userfaultfd is opened with UFFD_USER_MODE_ONLY (Linux 5.11),
//   which only stops kernel-mode faults from being handled, and the
//   monitor handles none. Memory registered with another userfaultfd (the
//   application's own, e.g. post-copy migration) cannot be watched (EBUSY).
// - Files (MemorySource::from_file with FileSeal::allow_shrink): an inotify
//   watch; a truncation is reported for the offsets past the new end. A
//   file carrying F_SEAL_SHRINK cannot shrink: its watch watches nothing.
//
// Events (Invalidation::cause) and their windows
// - discard: UFFD_EVENT_REMOVE (madvise MADV_DONTNEED, MADV_REMOVE,
//   MADV_FREE). Reported BEFORE the zap: the madvising thread queues the
//   event and sleeps until the monitor has read it, then zaps. The monitor
//   counts a batch as started before it reads, and a guarded copy (below)
//   settles every started batch after copying, then checks its notifier's
//   sequence. So a copy that read zapped (zero) memory always sees the
//   invalidation: the window is closed.
// - munmap: UFFD_EVENT_UNMAP (munmap, mmap MAP_FIXED over the memory,
//   mremap over it). Reported AFTER the fact: the kernel unmaps (or maps
//   the replacement), drops the mmap lock, then queues the event, and the
//   unmapping thread sleeps until the monitor has read it (not until the
//   callbacks have run). Before the read, a copy of the old addresses
//   fails with EFAULT (nothing mapped), so it never reads replaced memory,
//   except when the memory was replaced in place (MAP_FIXED) or another
//   thread mapped new memory at those addresses before the monitor read
//   the event: such a copy reads the new memory and nothing in user space
//   can tell it apart. That window cannot be closed without the kernel's
//   help. Memory the unmapping thread itself maps after munmap returns is
//   covered: the batch had started by then.
// - remap: UFFD_EVENT_REMAP (mremap moving the memory), for the old
//   addresses. After the fact, as munmap.
// - truncate: inotify IN_MODIFY with a smaller size. After the fact and
//   asynchronous: the truncating thread does not wait. A guarded copy of
//   the truncated part fails with EFAULT (never SIGBUS) until the file
//   grows again; a file that shrinks and grows back before the monitor
//   reads the event shows zeros in between.
//
// Guarded copies (read_watched / write_watched): the copy path for user
// memory under a notifier. read_begin, a process_vm_readv/writev copy
// (EFAULT on an unmapped address, no signal), then every monitor batch
// started so far is settled and the notifier's sequence checked: an
// invalidation that began before the copy finished makes it EFAULT. A read
// that raced is discarded; a write that raced may have reached the memory
// being invalidated (it is reported, not undone).
//
// Errors
// - EINVAL    simulated or device source (a P2P pool's unbind unmaps its
//             IOAS mappings itself); memory userfaultfd cannot watch (not
//             anonymous, shmem or hugetlb), or nothing mapped.
// - EFAULT    part of the range is not mapped (watch); the memory is gone,
//             or the copy raced with an invalidation (copies).
// - EBUSY     registered with another userfaultfd.
// - EPERM, ENOTSUP userfaultfd unavailable (seccomp, an old kernel).
// - EDEADLK   a guarded copy on the monitor's own thread (a callback).
// - ENOMEM, ENOSPC (inotify watch limit), EMFILE.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "iomm/export.hpp"
#include "iomm/notifier.hpp"
#include "iomm/result.hpp"
#include "iomm/source.hpp"

namespace iomm {

class IOMM_API MemoryWatch {
 public:
  static Result<std::unique_ptr<MemoryWatch>> create(const MemorySource& source);
  ~MemoryWatch();
  MemoryWatch(const MemoryWatch&) = delete;
  MemoryWatch& operator=(const MemoryWatch&) = delete;

 private:
  MemoryWatch(MemorySource source, bool registered)
      : source_(std::move(source)), registered_(registered) {}
  MemorySource source_;
  bool registered_;
};

IOMM_API Status read_watched(IntervalNotifier& notifier, void* buf, const void* address,
                             size_t length);
IOMM_API Status write_watched(IntervalNotifier& notifier, void* address, const void* buf,
                              size_t length);

struct MemoryMonitorStats {
  bool running = false;
  bool user_mode_only = false;  // the userfaultfd needed UFFD_USER_MODE_ONLY
  uint64_t batches = 0;         // wake-ups that read events
  uint64_t unmaps = 0;
  uint64_t removes = 0;
  uint64_t remaps = 0;
  uint64_t truncations = 0;
};

IOMM_API MemoryMonitorStats memory_monitor_stats() noexcept;

}  // namespace iomm
