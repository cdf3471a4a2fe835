// RCU read-side guard for callers that keep a host pointer from
// SoftDomain::translate() or Access pointers across a short critical section.
//
// Contract: while a guard lives, memory reachable through a translation
// obtained after the guard was taken is not unpinned or unmapped. Guards nest
// and are cheap (liburcu bulletproof flavour: no registration needed). Do not
// block, sleep or call back into iomm map/unmap while holding one.
#pragma once

#include "iomm/export.hpp"

namespace iomm {

class IOMM_API RcuReadGuard {
 public:
  RcuReadGuard() noexcept;
  ~RcuReadGuard();
  RcuReadGuard(const RcuReadGuard&) = delete;
  RcuReadGuard& operator=(const RcuReadGuard&) = delete;
};

}  // namespace iomm
