#include <fstream>
#include <string>

#include "acct/owner.hpp"
#include "iomm/accounting.hpp"
#include "mem/mem_object.hpp"

namespace iomm {

uint64_t process_vmlck_bytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmLck:", 0) == 0) return std::stoull(line.substr(6)) * 1024;  // "N kB"
  }
  return 0;
}

Counters counters() {
  Counters c;
  const mem::PinCounters pins = mem::pin_counters();
  c.pinned_bytes = pins.pinned_bytes;
  c.simulated_pinned_bytes = pins.simulated_pinned_bytes;
  c.vmlck_bytes = process_vmlck_bytes();
  for (const auto& owner : acct::ledger_owners()) {
    const uint64_t charged = owner->charged_pages() * kPageSize;
    c.charged_bytes += charged;
    if (charged == 0 && !owner->limit_configured()) continue;
    std::optional<uint64_t> limit = owner->limit_pages();
    if (limit) *limit *= kPageSize;
    c.owners.push_back({owner->mode(), owner->id(), charged, limit});
  }
  return c;
}

}  // namespace iomm
