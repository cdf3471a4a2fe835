// Touching memory that can be revoked under the caller.
//
// A mapping of a device region (DeviceRegion) raises SIGBUS once its memory
// is disabled or the region revoked, and so does a P2P pool allocation's
// mapping after unbind, or any MAP_SHARED mapping of a file truncated under
// it. guarded_copy turns that SIGBUS into an error for one copy, so a
// consumer that must survive revocation needs no signal handler of its own.
//
// Contract
// - Copies n bytes from src to dst, either of which may be such a mapping.
//   On success every byte was copied.
// - Recovers a SIGBUS raised by the copy's own accesses inside dst or src
//   with si_code BUS_ADRERR or BUS_OBJERR (a page that vanished) or
//   BUS_MCEERR_AR (a poisoned page: revoked device memory is poisoned with
//   UFFDIO_POISON, which the kernel reports as hardware poison). Every other
//   SIGBUS goes where install_signal_handlers() (iomm/signals.hpp) sends it.
//   A SIGSEGV (an address that is not mapped at all) is not recovered.
// - Installs the library's SIGBUS handler if it is not yet installed.
// - Thread-safe; one copy per thread at a time (it is not reentrant from a
//   signal handler).
//
// Errors
// - EFAULT  the copy hit a recovered SIGBUS; dst may be partially written.
#pragma once

#include <cstddef>

#include "iomm/export.hpp"
#include "iomm/result.hpp"

namespace iomm {

IOMM_API Status guarded_copy(void* dst, const void* src, size_t n) noexcept;

}  // namespace iomm
