// Fault injection: every fallible step of the library is a named point.
//
// In test builds (IOMM_FAULT_INJECTION, the iomm_testing library) a test arms
// the calling thread with fail_nth(N); the Nth point that thread reaches
// reports failure and the caller takes its real error path (iommufd's
// fail_nth, in user space). Points are per thread, so concurrent threads do
// not disturb each other. In the production library IOMM_INJECT is the
// constant false and costs nothing.
//
// The points are listed in docs/testing.md; add one with a single
// `if (IOMM_INJECT("area.what")) <fail as the real call would>;`.
#pragma once

#include <cstdint>

namespace iomm::fault {

#ifdef IOMM_FAULT_INJECTION
bool should_fail(const char* point) noexcept;
#define IOMM_INJECT(point) (::iomm::fault::should_fail(point))
#else
#define IOMM_INJECT(point) (false)
#endif

}  // namespace iomm::fault
