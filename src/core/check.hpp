// Internal consistency checks that stay in every build.
//
// An IOMM_CHECK guards an invariant whose violation means the library's own
// bookkeeping is corrupt (a count underflow, an unwind that failed). These
// are cheap comparisons, and continuing past one would mis-account or free
// memory still in use, so they abort with a message in release builds too,
// unlike assert(), which RelWithDebInfo compiles out.
#pragma once

namespace iomm::core {

[[noreturn]] void check_failed(const char* condition, const char* what, const char* file,
                               int line) noexcept;

}  // namespace iomm::core

#define IOMM_CHECK(condition, what)                                       \
  do {                                                                    \
    if (!(condition)) [[unlikely]]                                        \
      ::iomm::core::check_failed(#condition, (what), __FILE__, __LINE__); \
  } while (false)
