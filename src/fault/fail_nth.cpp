#ifdef IOMM_FAULT_INJECTION

#include "fault/fail_nth.hpp"

#include <filesystem>

#include "fault/inject.hpp"

namespace iomm::fault {

namespace {

struct ThreadPlan {
  bool armed = false;
  uint64_t nth = 0;
  uint64_t reached = 0;
  const char* name = nullptr;
  const char* file = nullptr;
  int line = 0;
};

thread_local ThreadPlan plan;

}  // namespace

bool should_fail(const char* name, const char* file, int line) noexcept {
  if (!plan.armed) return false;
  if (++plan.reached != plan.nth) return false;
  plan.name = name;
  plan.file = file;
  plan.line = line;
  return true;
}

void fail_nth(uint64_t nth) noexcept { plan = ThreadPlan{true, nth, 0, nullptr, nullptr, 0}; }

Report disarm() {
  Report r;
  r.sites_reached = plan.reached;
  if (plan.name != nullptr) {
    r.failed_name = plan.name;
    r.failed_site = site_of(plan.file, plan.line);
  }
  plan = ThreadPlan{};
  return r;
}

std::string site_of(const char* file, int line) {
  const std::string path = std::filesystem::path(file).lexically_normal().generic_string();
  // The last "src/" segment starts the path inside the repository.
  size_t at = path.rfind("/src/");
  at = at == std::string::npos ? (path.rfind("src/", 0) == 0 ? 0 : std::string::npos) : at + 1;
  return (at == std::string::npos ? path : path.substr(at)) + ":" + std::to_string(line);
}

}  // namespace iomm::fault

#endif  // IOMM_FAULT_INJECTION
