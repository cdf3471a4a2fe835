#ifdef IOMM_FAULT_INJECTION

#include "fault/fail_nth.hpp"

#include "fault/inject.hpp"

namespace iomm::fault {

namespace {

struct ThreadPlan {
  bool armed = false;
  uint64_t nth = 0;
  uint64_t reached = 0;
  const char* failed = nullptr;
};

thread_local ThreadPlan plan;

}  // namespace

bool should_fail(const char* point) noexcept {
  if (!plan.armed) return false;
  if (++plan.reached != plan.nth) return false;
  plan.failed = point;
  return true;
}

void fail_nth(uint64_t nth) noexcept { plan = ThreadPlan{true, nth, 0, nullptr}; }

Report disarm() {
  Report r{plan.reached, plan.failed != nullptr ? plan.failed : ""};
  plan = ThreadPlan{};
  return r;
}

}  // namespace iomm::fault

#endif  // IOMM_FAULT_INJECTION
