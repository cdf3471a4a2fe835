// Fault injection: every fallible step of the library is an injection site.
//
// In test builds (IOMM_FAULT_INJECTION, the iomm_testing library) a test arms
// the calling thread with fail_nth(N); the Nth site that thread reaches
// reports failure and the caller takes its real error path (iommufd's
// fail_nth, in user space). Sites are per thread, so concurrent threads do
// not disturb each other. In the production library IOMM_INJECT is the
// constant false and costs nothing.
//
// A site is identified by its file and line; the name says which kind of
// failure it stands for (several sites may share one). The sites are listed
// at build time from src/ (tests/list_inject_sites.cmake), and the
// fault-injection tests check that some scenario fails each of them; the
// names are described in docs/testing.md. Add a site with a single
// `if (IOMM_INJECT("area.what")) <fail as the real call would>;`.
#pragma once

#include <cstdint>

namespace iomm::fault {

#ifdef IOMM_FAULT_INJECTION
bool should_fail(const char* name, const char* file, int line) noexcept;
#define IOMM_INJECT(name) (::iomm::fault::should_fail(name, __FILE__, __LINE__))
#else
#define IOMM_INJECT(name) (false)
#endif

}  // namespace iomm::fault
