// The signal handler the library needs, installed by an explicit call.
//
// Contract
// - A file mapped MAP_SHARED raises SIGBUS when the file is truncated under
//   the mapping. The library's copies into such mappings (device DMA through
//   a software domain, access reads and writes) turn that SIGBUS into EFAULT
//   with a handler for SIGBUS, which install_signal_handlers() installs.
// - The library calls it where copying can start: MemorySource::from_file
//   (before it maps the file) and SoftDomain::create. A process that creates
//   neither never has the handler; no copy runs without it (checked). Call
//   it yourself earlier to fix the order against your own handler.
// - Installing takes one sigaction call, which also records the action it
//   replaces. Later calls do nothing. Thread-safe; never fails.
// - The handler recovers only a SIGBUS with si_code BUS_ADRERR or BUS_OBJERR
//   whose si_addr lies inside the source or destination of a library copy
//   running on the faulting thread. Everything else (machine checks,
//   BUS_MCEERR_AR and BUS_MCEERR_AO; faults outside a copy; signals sent
//   with kill or sigqueue) goes to the action it replaced, with the real
//   siginfo and context:
//   - a handler: called under the mask and with the flags it asked for;
//   - SIG_DFL: the default is restored and the fault repeats (or a sent
//     signal is queued again with its siginfo), so the process dies of it as
//     it would have without us;
//   - SIG_IGN: a fault cannot be ignored (the kernel forces the default for
//     it), so the default is restored and the fault repeats; a sent signal
//     is ignored.
// - A SIGBUS handler installed after ours replaces it. It must pass signals
//   it does not handle on to the action it replaced (with the same siginfo
//   and context), or a truncated file kills the process instead of failing a
//   copy with EFAULT.
#pragma once

#include "iomm/export.hpp"

namespace iomm {

IOMM_API void install_signal_handlers() noexcept;

}  // namespace iomm
