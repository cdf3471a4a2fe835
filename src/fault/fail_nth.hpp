// Test-side control of the fault-injection sites (see inject.hpp). Only in
// the iomm_testing library.
#pragma once

#include <cstdint>
#include <string>

namespace iomm::fault {

// Make the nth (1-based) site this thread reaches fail.
void fail_nth(uint64_t nth) noexcept;

struct Report {
  uint64_t sites_reached = 0;  // sites reached since fail_nth()
  std::string failed_name;     // the name of the site that failed, or empty
  std::string failed_site;     // its "src/<path>:<line>", or empty
};

// Stop injecting on this thread and say what happened.
Report disarm();

// "src/<path>:<line>" for a site's __FILE__ and __LINE__, whatever form the
// compiler gave the path in (absolute, relative, with "..").
std::string site_of(const char* file, int line);

}  // namespace iomm::fault
