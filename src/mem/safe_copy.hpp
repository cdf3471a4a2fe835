// Copies that survive a file vanishing under them.
//
// A MAP_SHARED mapping of an unsealed memfd raises SIGBUS when the file is
// truncated under it. Copies into the library's file mappings go through
// safe_copy, which turns a SIGBUS raised by the copy's own accesses into a
// false return (EFAULT for the caller) instead of a crash. The handler is
// installed by iomm::install_signal_handlers() (iomm/signals.hpp), which
// documents what happens to every other SIGBUS.
#pragma once

#include <signal.h>

#include <cstddef>

namespace iomm::mem {

// Which SIGBUS a copy fails on instead of passing it on.
enum class Recover {
  // A page that vanished (BUS_ADRERR, BUS_OBJERR: a truncated file). The
  // library's own copies: a machine check there reports broken hardware,
  // which a failed copy would hide.
  vanished,
  // Also a poisoned page the copy touched (BUS_MCEERR_AR). Memory the
  // caller knows can be revoked: a revoked device region is poisoned with
  // UFFDIO_POISON, which the kernel reports exactly like hardware poison.
  vanished_or_poisoned,
};

// Copy n bytes. False if the copy hit a SIGBUS `recover` covers; the
// destination may then be partially written. The handler must be installed
// (checked).
bool safe_copy(void* dst, const void* src, size_t n, Recover recover = Recover::vanished) noexcept;

// The two ranges a running safe_copy touches.
struct CopyWindow {
  const void* dst;
  const void* src;
  size_t n;
  Recover recover = Recover::vanished;
};

enum class SigbusVerdict {
  recover,  // the copy's own access hit a vanished page: fail the copy
  pass_on,  // not ours: the action we replaced decides
};

// The handler's decision for a SIGBUS with `info` arriving on a thread whose
// running copy is `window` (nullptr: none).
SigbusVerdict classify_sigbus(const siginfo_t& info, const CopyWindow* window) noexcept;

}  // namespace iomm::mem
