#include "monitor/process_monitor.hpp"

#include <atomic>
#include <mutex>

#include "notify/invalidate.hpp"
#include "sync/ranked_mutex.hpp"

namespace iomm::monitor {

namespace {

std::atomic<EventMonitor*> g_monitor{nullptr};
sync::RankedMutex g_start_mu{sync::LockRank::monitor_start, "monitor start mutex"};

}  // namespace

Result<EventMonitor*> process_monitor() {
  if (EventMonitor* m = g_monitor.load(std::memory_order_acquire)) return m;
  std::lock_guard lk(g_start_mu);
  if (EventMonitor* m = g_monitor.load(std::memory_order_acquire)) return m;
  auto started = EventMonitor::start([](const MemoryEvent& ev) {
    notify::invalidate_source(*ev.object, IovaRange{ev.start, ev.last}, ev.cause);
  });
  if (!started.ok()) return std::move(started).error();
  // Never destroyed: the thread serves the process until it exits.
  EventMonitor* m = std::move(started).value().release();
  g_monitor.store(m, std::memory_order_release);
  return m;
}

EventMonitor* running_monitor() noexcept { return g_monitor.load(std::memory_order_acquire); }

Status settle_user_copies() {
  EventMonitor* m = g_monitor.load(std::memory_order_acquire);
  return m == nullptr ? Status() : m->settle();
}

}  // namespace iomm::monitor
