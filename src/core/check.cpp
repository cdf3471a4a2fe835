#include "core/check.hpp"

#include <cstdio>
#include <cstdlib>

namespace iomm::core {

void check_failed(const char* condition, const char* what, const char* file, int line) noexcept {
  std::fprintf(stderr, "iomm: internal check failed at %s:%d: %s (%s)\n", file, line, what,
               condition);
  std::fflush(stderr);
  std::abort();
}

}  // namespace iomm::core
