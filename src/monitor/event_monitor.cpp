#include "monitor/event_monitor.hpp"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <array>
#include <cstring>
#include <new>
#include <string>

#include "core/errno_text.hpp"
#include "iomm/range.hpp"

namespace iomm::monitor {

namespace {

// Linux 5.11; the build's headers may predate it.
#ifndef UFFD_USER_MODE_ONLY
constexpr int UFFD_USER_MODE_ONLY = 1;
#endif

constexpr uint64_t kEvents =
    UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_REMAP;

// Without it shmem and hugetlb VMAs cannot be registered in WP mode;
// anonymous memory still can.
constexpr uint64_t kOptional = UFFD_FEATURE_WP_HUGETLBFS_SHMEM;

// Whether the calling thread is the monitor thread.
thread_local bool t_monitor_thread = false;

int open_uffd(int flags) {
  return static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | flags));
}

// The features this kernel offers: UFFDIO_API may be called once per fd,
// so ask a throwaway one.
Result<uint64_t> supported_features(int flags) {
  const int fd = open_uffd(flags);
  if (fd < 0) return Error(errno, std::string("userfaultfd: ") + errno_text(errno));
  uffdio_api api{.api = UFFD_API, .features = 0, .ioctls = 0};
  const int rc = ioctl(fd, UFFDIO_API, &api);
  const int err = errno;
  close(fd);
  if (rc != 0) return Error(err, std::string("UFFDIO_API: ") + errno_text(err));
  return static_cast<uint64_t>(api.features);
}

}  // namespace

Result<std::unique_ptr<EventMonitor>> EventMonitor::start(Sink sink) {
  // The plain kind is refused to an unprivileged process unless
  // vm.unprivileged_userfaultfd is 1; the user-mode-only kind (Linux 5.11)
  // is always allowed, and loses nothing here: it only stops faults taken
  // in kernel mode from being handled, and the monitor handles no fault.
  int flags = 0;
  int uffd = open_uffd(flags);
  if (uffd < 0 && errno == EPERM) {
    flags = UFFD_USER_MODE_ONLY;
    uffd = open_uffd(flags);
  }
  if (uffd < 0) {
    const int err = errno;
    return Error(err == ENOSYS ? ENOTSUP : err,
                 std::string("cannot open a userfaultfd: ") + errno_text(err));
  }
  auto supported = supported_features(flags);
  if (!supported.ok()) {
    close(uffd);
    return std::move(supported).error();
  }
  if ((*supported & kEvents) != kEvents) {
    close(uffd);
    return Error(ENOTSUP, "this kernel's userfaultfd lacks the UNMAP, REMOVE or REMAP event");
  }
  uffdio_api api{.api = UFFD_API, .features = kEvents | (*supported & kOptional), .ioctls = 0};
  if (ioctl(uffd, UFFDIO_API, &api) != 0) {
    const int err = errno;
    close(uffd);
    return Error(err, std::string("UFFDIO_API: ") + errno_text(err));
  }
  const int inotify = inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
  const int stop = inotify < 0 ? -1 : eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop < 0) {
    const int err = errno;
    close(uffd);
    if (inotify >= 0) close(inotify);
    return Error(err, std::string("inotify_init1/eventfd: ") + errno_text(err));
  }
  auto fail = [&](Error e) {
    close(uffd);
    close(inotify);
    close(stop);
    return e;
  };
  try {
    return std::unique_ptr<EventMonitor>(
        new EventMonitor(uffd, inotify, stop, flags != 0, std::move(sink)));
  } catch (const std::bad_alloc&) {
    return fail(Error(ENOMEM, "out of memory"));
  } catch (const std::system_error& e) {
    return fail(Error(EAGAIN, std::string("cannot start the monitor thread: ") + e.what()));
  }
}

EventMonitor::EventMonitor(int uffd, int inotify_fd, int stop_fd, bool user_mode_only, Sink sink)
    : uffd_(uffd),
      inotify_fd_(inotify_fd),
      stop_fd_(stop_fd),
      user_mode_only_(user_mode_only),
      sink_(std::move(sink)),
      user_(mem::user_object()),
      thread_([this] { run(); }) {}

EventMonitor::~EventMonitor() {
  const uint64_t one = 1;
  // An eventfd write of 1 cannot fail short of a counter at its maximum.
  while (write(stop_fd_, &one, sizeof(one)) < 0 && errno == EINTR) {
  }
  thread_.join();
  // Closing the fd releases every thread still waiting for an event to be
  // read, and unregisters every range.
  close(uffd_);
  close(inotify_fd_);
  close(stop_fd_);
}

void EventMonitor::run() noexcept {
  t_monitor_thread = true;
  std::array<uffd_msg, 16> msgs{};
  alignas(inotify_event) std::array<char, 4096> notes{};
  for (;;) {
    std::array<pollfd, 3> fds{pollfd{uffd_, POLLIN, 0}, pollfd{inotify_fd_, POLLIN, 0},
                              pollfd{stop_fd_, POLLIN, 0}};
    if (poll(fds.data(), fds.size(), -1) < 0) continue;  // EINTR
    if (fds[2].revents != 0) return;
    // Before the first read: the kernel holds a REMOVE's zap, and a
    // munmapping thread's return, until its event is read.
    const uint64_t batch = started_.fetch_add(1, std::memory_order_seq_cst) + 1;
    batches_.fetch_add(1, std::memory_order_relaxed);
    for (;;) {
      const ssize_t n = read(uffd_, msgs.data(), sizeof(msgs));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;  // EAGAIN: the batch is complete
      for (size_t i = 0; i < static_cast<size_t>(n) / sizeof(uffd_msg); ++i) deliver(msgs[i]);
    }
    for (;;) {
      const ssize_t n = read(inotify_fd_, notes.data(), notes.size());
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      for (ssize_t off = 0; off < n;) {
        inotify_event ev{};
        std::memcpy(&ev, notes.data() + off, sizeof(ev));
        if ((ev.mask & IN_MODIFY) != 0) file_changed(ev.wd);
        off += static_cast<ssize_t>(sizeof(inotify_event) + ev.len);
      }
    }
    finished_.store(batch, std::memory_order_seq_cst);
    finished_.notify_all();
  }
}

void EventMonitor::file_changed(int wd) noexcept {
  std::shared_ptr<mem::FileObject> file;
  uint64_t before = 0;
  uint64_t now = 0;
  {
    std::lock_guard lk(mu_);
    auto it = files_.find(wd);
    if (it == files_.end()) return;
    const int64_t size = it->second.file->file_size();
    if (size < 0) return;
    before = it->second.size;
    now = static_cast<uint64_t>(size);
    it->second.size = now;
    if (now >= before) return;  // grown, or written
    file = it->second.file;
  }
  truncations_.fetch_add(1, std::memory_order_relaxed);
  sink_({file.get(), now, before - 1, InvalidationCause::truncate});
}

Status EventMonitor::watch_file(const std::shared_ptr<mem::FileObject>& file) {
  const int64_t size = file->file_size();
  if (size < 0) return Error(EBADF, "cannot fstat the file");
  std::lock_guard lk(mu_);
  // One watch descriptor per inode: a file watched twice gets the same one.
  const int wd = file->add_inotify_watch(inotify_fd_, IN_MODIFY);
  if (wd < 0) {
    const int err = errno;
    return Error(err == ENOSPC ? ENOSPC : err,
                 std::string("inotify_add_watch: ") + errno_text(err));
  }
  try {
    auto [it, fresh] = files_.try_emplace(wd, FileWatch{file, static_cast<uint64_t>(size), 0});
    ++it->second.count;
  } catch (const std::bad_alloc&) {
    inotify_rm_watch(inotify_fd_, wd);
    return Error(ENOMEM, "out of memory");
  }
  return {};
}

void EventMonitor::unwatch_file(const mem::FileObject& file) noexcept {
  std::shared_ptr<mem::FileObject> last;  // released after mu_
  std::lock_guard lk(mu_);
  for (auto it = files_.begin(); it != files_.end(); ++it) {
    if (it->second.file.get() != &file) continue;
    if (--it->second.count == 0) {
      inotify_rm_watch(inotify_fd_, it->first);
      last = std::move(it->second.file);
      files_.erase(it);
    }
    return;
  }
}

void EventMonitor::deliver(const uffd_msg& msg) noexcept {
  MemoryEvent ev{};
  switch (msg.event) {
    case UFFD_EVENT_UNMAP:
    case UFFD_EVENT_REMOVE:
      if (msg.arg.remove.end <= msg.arg.remove.start) return;
      ev = {user_.get(), msg.arg.remove.start, msg.arg.remove.end - 1,
            msg.event == UFFD_EVENT_UNMAP ? InvalidationCause::munmap : InvalidationCause::discard};
      (msg.event == UFFD_EVENT_UNMAP ? unmaps_ : removes_).fetch_add(1, std::memory_order_relaxed);
      break;
    case UFFD_EVENT_REMAP:
      if (msg.arg.remap.len == 0) return;
      // The memory now lives at `to` (still registered with us: the VMA
      // moved with its registration); the watched addresses are `from`.
      ev = {user_.get(), msg.arg.remap.from, msg.arg.remap.from + msg.arg.remap.len - 1,
            InvalidationCause::remap};
      remaps_.fetch_add(1, std::memory_order_relaxed);
      break;
    default:
      // Nothing is write-protected and no other feature was asked for, so
      // no page fault or fork event can arrive.
      return;
  }
  sink_(ev);
}

Status EventMonitor::settle() const {
  const uint64_t target = started_.load(std::memory_order_seq_cst);
  if (finished_.load(std::memory_order_seq_cst) >= target) return {};
  if (t_monitor_thread) {
    return Error(EDEADLK, "a copy on the memory monitor's thread cannot wait for its events");
  }
  for (uint64_t done = finished_.load(std::memory_order_seq_cst); done < target;
       done = finished_.load(std::memory_order_seq_cst)) {
    finished_.wait(done, std::memory_order_seq_cst);
  }
  return {};
}

Status EventMonitor::watch(uint64_t start, uint64_t length) {
  const auto range = make_range(start, length);
  if (length == 0) return Error(EINVAL, "zero length");
  if (!range) return Error(EOVERFLOW, "address + length wraps");
  const uint64_t first = range->start >> kPageShift;
  const uint64_t last = range->last >> kPageShift;
  std::lock_guard lk(mu_);
  try {
    registered_.cover(first, last);
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory");
  }
  // Registering pages this monitor registered already is allowed, so the
  // whole range goes in one call, which is all-or-nothing in the kernel.
  uffdio_register reg{};
  reg.range = {first << kPageShift, (last - first + 1) << kPageShift};
  reg.mode = UFFDIO_REGISTER_MODE_WP;
  if (ioctl(uffd_, UFFDIO_REGISTER, &reg) != 0) {
    const int err = errno;
    registered_.erase_zeros(first, last);
    switch (err) {
      case EINVAL:
      case ENOMEM:
        // Nothing in the range is mapped, or part of it is memory
        // userfaultfd cannot watch (checked before anything is registered).
        return Error(EINVAL,
                     "userfaultfd cannot watch this range (not mapped, or not anonymous, shmem or "
                     "hugetlb memory)");
      case EBUSY:
        return Error(EBUSY, "the memory is registered with another userfaultfd");
      default:
        return Error(err, std::string("UFFDIO_REGISTER: ") + errno_text(err));
    }
  }
  // The kernel registers the mapped parts of a range with holes and says
  // nothing: look for holes afterwards, since memory unmapped after the
  // registration is reported as an event anyway.
  if (msync(reinterpret_cast<void*>(reg.range.start), reg.range.len, MS_ASYNC) != 0) {
    unregister_unwatched(first, last);
    registered_.erase_zeros(first, last);
    return Error(EFAULT, "part of the range is not mapped");
  }
  registered_.add(first, last, +1, 0);
  return {};
}

void EventMonitor::unwatch(uint64_t start, uint64_t length) noexcept {
  const auto range = make_range(start, length);
  if (!range) return;
  const uint64_t first = range->start >> kPageShift;
  const uint64_t last = range->last >> kPageShift;
  std::lock_guard lk(mu_);
  registered_.add(first, last, -1, 0);
  unregister_unwatched(first, last);
  registered_.erase_zeros(first, last);
}

void EventMonitor::unregister_unwatched(uint64_t first, uint64_t last) noexcept {
  auto& segs = registered_.segments();
  for (auto it = segs.lower_bound(first); it != segs.end() && it->first <= last; ++it) {
    if (it->second.count != 0) continue;
    uffdio_range r{it->first << kPageShift, (it->second.last - it->first + 1) << kPageShift};
    // Memory unmapped since is unregistered already; the call skips holes.
    ioctl(uffd_, UFFDIO_UNREGISTER, &r);
  }
}

MonitorCounts EventMonitor::counts() const noexcept {
  return {batches_.load(std::memory_order_relaxed), unmaps_.load(std::memory_order_relaxed),
          removes_.load(std::memory_order_relaxed), remaps_.load(std::memory_order_relaxed),
          truncations_.load(std::memory_order_relaxed)};
}

}  // namespace iomm::monitor
