// RCU grace periods (liburcu, bulletproof flavour) for the library's own
// writers. Readers use iomm::RcuReadGuard (include/iomm/rcu.hpp).
#pragma once

namespace iomm::sync {

// Wait until every RCU read-side section that began before the call has
// ended. Must not be called inside a read-side section.
void rcu_synchronize() noexcept;

// How many RcuReadGuards this thread holds. constinit: no TLS wrapper call;
// initial-exec: in the shared library (built position-independent) a read
// is one %fs-relative load instead of a __tls_get_addr call. Four bytes of
// static TLS, which even a dlopen of the library finds in glibc's reserve.
[[gnu::tls_model("initial-exec")]] extern constinit thread_local unsigned t_read_depth;

// Whether the calling thread is inside a read-side section already, so a
// lock-free walk on the hot path (translate) can skip entering its own:
// liburcu-bp's read lock is an out-of-line call with a full barrier.
inline bool in_read_section() noexcept { return t_read_depth != 0; }

}  // namespace iomm::sync
