// RCU grace periods (liburcu, bulletproof flavour) for the library's own
// writers. Readers use iomm::RcuReadGuard (include/iomm/rcu.hpp).
#pragma once

namespace iomm::sync {

// Wait until every RCU read-side section that began before the call has
// ended. Must not be called inside a read-side section.
void rcu_synchronize() noexcept;

}  // namespace iomm::sync
