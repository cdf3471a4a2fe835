#include <new>

#include "iomm/memory_monitor.hpp"
#include "mem/checked_copy.hpp"
#include "mem/file_object.hpp"
#include "monitor/process_monitor.hpp"

namespace iomm {

namespace {

// What a watch of the source registers: user memory, or a file that may
// shrink. A shrink-sealed file cannot shrink: there is nothing to watch.
enum class Watched { nothing, user, file };

Watched what_to_watch(const MemorySource& source) {
  switch (source.kind()) {
    case SourceKind::user:
      return Watched::user;
    case SourceKind::file:
      return source.shrink_sealed() ? Watched::nothing : Watched::file;
    case SourceKind::simulated:
    case SourceKind::device:
      break;
  }
  return Watched::nothing;
}

void unregister(monitor::EventMonitor& m, const MemorySource& source, Watched what) noexcept {
  if (what == Watched::user) m.unwatch(source.offset(), source.length());
  if (what == Watched::file) {
    m.unwatch_file(static_cast<const mem::FileObject&>(*source.object()));
  }
}

}  // namespace

Result<std::unique_ptr<MemoryWatch>> MemoryWatch::create(const MemorySource& source) {
  if (source.kind() == SourceKind::simulated) {
    return Error(EINVAL, "simulated memory has nothing to watch");
  }
  // Device memory goes away only by its pool's unbind, which unmaps every
  // IOAS mapping of it (and so reaches their notifiers) itself.
  if (source.kind() == SourceKind::device) {
    return Error(EINVAL, "device memory is revoked by its pool, not watched");
  }
  const Watched what = what_to_watch(source);
  monitor::EventMonitor* m = nullptr;
  if (what != Watched::nothing) {
    auto running = monitor::process_monitor();
    if (!running.ok()) return std::move(running).error();
    m = *running;
    Status s = what == Watched::user
                   ? m->watch(source.offset(), source.length())
                   : m->watch_file(std::static_pointer_cast<mem::FileObject>(source.object()));
    if (!s) return s.error();
  }
  auto* watch = new (std::nothrow) MemoryWatch(source, what != Watched::nothing);
  if (watch == nullptr) {
    if (m != nullptr) unregister(*m, source, what);
    return Error(ENOMEM, "out of memory");
  }
  return std::unique_ptr<MemoryWatch>(watch);
}

MemoryWatch::~MemoryWatch() {
  // A registration started the monitor, which runs until exit.
  if (registered_) unregister(*monitor::running_monitor(), source_, what_to_watch(source_));
}

namespace {

Status guarded(IntervalNotifier& notifier, void* local, const void* remote, size_t length,
               bool write) {
  if (length == 0) return {};
  const uint64_t seq = notifier.read_begin();
  const auto addr = reinterpret_cast<uint64_t>(remote);
  const bool copied =
      write ? mem::checked_write(addr, local, length) : mem::checked_read(local, addr, length);
  if (Status s = monitor::settle_user_copies(); !s) return s;
  if (!copied) return Error(EFAULT, "the memory is not mapped (or not writable)");
  if (notifier.read_retry(seq)) {
    return Error(EFAULT, "the copy raced with an invalidation of the memory");
  }
  return {};
}

}  // namespace

Status read_watched(IntervalNotifier& notifier, void* buf, const void* address, size_t length) {
  return guarded(notifier, buf, address, length, false);
}

Status write_watched(IntervalNotifier& notifier, void* address, const void* buf, size_t length) {
  return guarded(notifier, const_cast<void*>(buf), address, length, true);
}

MemoryMonitorStats memory_monitor_stats() noexcept {
  const monitor::EventMonitor* m = monitor::running_monitor();
  if (m == nullptr) return {};
  const monitor::MonitorCounts c = m->counts();
  return {true, m->user_mode_only(), c.batches, c.unmaps, c.removes, c.remaps, c.truncations};
}

}  // namespace iomm
