// Result markers the guest harness reads from the console
// (tests/guest/lib.sh, guest_collect): one line each, flushed at once so a
// crash later cannot lose them.
#pragma once

#include <cstdio>
#include <string>

namespace iomm::guest {

inline int failures = 0;

inline void pass(const std::string& check) {
  std::printf("IOMM_GUEST_PASS %s\n", check.c_str());
  std::fflush(stdout);
}

inline void fail(const std::string& check, const std::string& reason) {
  ++failures;
  std::printf("IOMM_GUEST_FAIL %s %s\n", check.c_str(), reason.c_str());
  std::fflush(stdout);
}

// pass or fail, by condition.
inline bool expect(bool ok, const std::string& check, const std::string& reason) {
  if (ok) {
    pass(check);
  } else {
    fail(check, reason);
  }
  return ok;
}

}  // namespace iomm::guest
