// The process's one event monitor (iomm/memory_monitor.hpp), started on
// first use and kept until the process exits, whose events invalidate the
// notifiers of the memory's backing object (notify::invalidate_source).
#pragma once

#include "iomm/result.hpp"
#include "monitor/event_monitor.hpp"

namespace iomm::monitor {

// The running monitor, starting it if needed. Errors as EventMonitor::start.
Result<EventMonitor*> process_monitor();

// The monitor if it was started, else nullptr.
EventMonitor* running_monitor() noexcept;

// After a guarded copy of user memory: settle the monitor's started
// batches (nothing to do when it never started). EDEADLK on its thread.
Status settle_user_copies();

}  // namespace iomm::monitor
