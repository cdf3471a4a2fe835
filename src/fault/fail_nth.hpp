// Test-side control of the fault-injection points (see inject.hpp). Only in
// the iomm_testing library.
#pragma once

#include <cstdint>
#include <string>

namespace iomm::fault {

// Make the nth (1-based) point this thread reaches fail.
void fail_nth(uint64_t nth) noexcept;

struct Report {
  uint64_t points_reached = 0;  // points reached since fail_nth()
  std::string failed_point;     // the point that failed, or empty
};

// Stop injecting on this thread and say what happened.
Report disarm();

}  // namespace iomm::fault
