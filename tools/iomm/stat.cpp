// `iomm stat`: the live counters of running iomm processes, read from the
// counter page each of them keeps in a memfd (see src/stats/shared_counters.hpp).
// Nothing is asked of the process: its /proc fd is mapped read-only.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "commands.hpp"
#include "iomm/range.hpp"
#include "output.hpp"
#include "stats/shared_counters.hpp"

namespace iomm::cli {
namespace {

namespace fs = std::filesystem;
using stats::SharedCounters;

struct OwnerStat {
  const char* mode;
  int id;
  uint64_t charged_bytes;
  std::optional<uint64_t> limit_bytes;  // nullopt: unlimited or not known yet
};

struct ProcessStat {
  int pid;
  std::string command;
  uint64_t pinned_bytes;
  uint64_t simulated_pinned_bytes;
  std::vector<OwnerStat> owners;
  uint64_t vmlck_bytes;
  uint64_t vmpin_bytes;
  // The kernel's VFIO objects the process holds open: containers
  // (/dev/vfio/vfio) and groups (/dev/vfio/N). Type1 charges what its
  // containers pin to the process's VmLck.
  int vfio_containers = 0;
  std::vector<int> vfio_groups;
};

// A read-only mapping of another process's counter page.
class CounterPage {
 public:
  explicit CounterPage(const fs::path& fd_link) {
    const int fd = open(fd_link.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    void* addr = mmap(nullptr, stats::kCountersBytes, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (addr != MAP_FAILED) page_ = static_cast<const SharedCounters*>(addr);
  }
  ~CounterPage() {
    if (page_ != nullptr) munmap(const_cast<SharedCounters*>(page_), stats::kCountersBytes);
  }
  CounterPage(const CounterPage&) = delete;
  CounterPage& operator=(const CounterPage&) = delete;

  // The page, if it is an initialised block of a layout we understand.
  [[nodiscard]] const SharedCounters* valid() const {
    if (page_ == nullptr || page_->magic.load(std::memory_order_acquire) != stats::kCountersMagic ||
        page_->version.load(std::memory_order_relaxed) != stats::kCountersVersion) {
      return nullptr;
    }
    return page_;
  }

 private:
  const SharedCounters* page_ = nullptr;
};

// Processes come and go while we scan, so a vanished directory ends the walk
// instead of throwing.
template <typename Visit>
void for_each_entry(const fs::path& dir, Visit visit) {
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (visit(it->path())) return;
  }
}

bool is_counter_memfd(const fs::path& fd_link) {
  static const std::string kTarget = std::string("/memfd:") + stats::kCountersMemfdName;
  std::error_code ec;
  const std::string target = fs::read_symlink(fd_link, ec).string();
  // A memfd's link reads "/memfd:<name> (deleted)".
  return !ec && target.compare(0, kTarget.size(), kTarget) == 0 &&
         (target.size() == kTarget.size() || target[kTarget.size()] == ' ');
}

std::string read_command(int pid) {
  std::ifstream comm("/proc/" + std::to_string(pid) + "/comm");
  std::string command;
  std::getline(comm, command);
  return command;
}

// A "VmXxx:   N kB" line of /proc/<pid>/status, in bytes.
uint64_t status_bytes(int pid, std::string_view field) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.size() > field.size() && line.compare(0, field.size(), field) == 0 &&
        line[field.size()] == ':') {
      return std::stoull(line.substr(field.size() + 1)) * 1024;
    }
  }
  return 0;
}

std::vector<OwnerStat> read_owners(const SharedCounters& block) {
  std::vector<OwnerStat> owners;
  for (const stats::OwnerSlot& slot : block.owners) {
    const uint32_t mode = slot.mode.load(std::memory_order_acquire);
    if (mode != stats::kSlotPerUser && mode != stats::kSlotPerProcess) continue;
    const uint64_t limit = slot.limit_pages.load(std::memory_order_relaxed);
    owners.push_back({
        .mode = to_string(mode == stats::kSlotPerUser ? AccountMode::per_user
                                                      : AccountMode::per_process),
        .id = slot.id.load(std::memory_order_relaxed),
        .charged_bytes = slot.charged_pages.load(std::memory_order_relaxed) * kPageSize,
        .limit_bytes =
            limit == stats::kNoLimit ? std::nullopt : std::optional<uint64_t>(limit * kPageSize),
    });
  }
  return owners;
}

// Which /dev/vfio files pid holds open.
void read_vfio_fds(ProcessStat& p) {
  for_each_entry("/proc/" + std::to_string(p.pid) + "/fd", [&](const fs::path& fd_link) {
    std::error_code ec;
    const std::string target = fs::read_symlink(fd_link, ec).string();
    const std::string prefix = "/dev/vfio/";
    if (ec || target.compare(0, prefix.size(), prefix) != 0) return false;
    const std::string name = target.substr(prefix.size());
    if (name == "vfio") {
      ++p.vfio_containers;
    } else if (!name.empty() && name.find_first_not_of("0123456789") == std::string::npos) {
      p.vfio_groups.push_back(std::stoi(name));
    }
    return false;
  });
  std::sort(p.vfio_groups.begin(), p.vfio_groups.end());
}

// The counters of pid, if it runs iomm and we may look at its fds.
std::optional<ProcessStat> inspect(int pid) {
  std::optional<ProcessStat> found;
  for_each_entry("/proc/" + std::to_string(pid) + "/fd", [&](const fs::path& fd_link) {
    if (!is_counter_memfd(fd_link)) return false;
    const CounterPage page(fd_link);
    const SharedCounters* block = page.valid();
    if (block == nullptr) return false;
    found = ProcessStat{
        .pid = pid,
        .command = read_command(pid),
        .pinned_bytes = block->pinned_pages.load(std::memory_order_relaxed) * kPageSize,
        .simulated_pinned_bytes =
            block->simulated_pinned_pages.load(std::memory_order_relaxed) * kPageSize,
        .owners = read_owners(*block),
        .vmlck_bytes = status_bytes(pid, "VmLck"),
        .vmpin_bytes = status_bytes(pid, "VmPin"),
    };
    return true;
  });
  if (found) read_vfio_fds(*found);
  return found;
}

std::vector<ProcessStat> scan(int only_pid) {
  std::vector<ProcessStat> found;
  if (only_pid != 0) {
    if (auto stat = inspect(only_pid)) found.push_back(std::move(*stat));
    return found;
  }
  const int self = static_cast<int>(getpid());
  for_each_entry("/proc", [&](const fs::path& entry) {
    const std::string name = entry.filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) return false;
    const int pid = std::stoi(name);
    if (pid == self) return false;
    if (auto stat = inspect(pid)) found.push_back(std::move(*stat));
    return false;
  });
  std::sort(found.begin(), found.end(),
            [](const ProcessStat& a, const ProcessStat& b) { return a.pid < b.pid; });
  return found;
}

void print_table(const std::vector<ProcessStat>& processes) {
  constexpr const char* kRowFormat = "%-8s %-16s %9s %9s %9s %9s\n";
  std::printf(kRowFormat, "PID", "COMMAND", "PINNED", "SIMULATED", "VmLck", "VmPin");
  for (const ProcessStat& p : processes) {
    std::printf(kRowFormat, std::to_string(p.pid).c_str(), p.command.c_str(),
                format_bytes(p.pinned_bytes).c_str(),
                format_bytes(p.simulated_pinned_bytes).c_str(), format_bytes(p.vmlck_bytes).c_str(),
                format_bytes(p.vmpin_bytes).c_str());
    for (const OwnerStat& o : p.owners) {
      std::printf("%-8s owner %s %d: charged %s, limit %s\n", "", o.mode, o.id,
                  format_bytes(o.charged_bytes).c_str(),
                  o.limit_bytes ? format_bytes(*o.limit_bytes).c_str() : "unlimited/unknown");
    }
    if (p.vfio_containers != 0 || !p.vfio_groups.empty()) {
      std::string groups;
      for (int g : p.vfio_groups) groups += " " + std::to_string(g);
      std::printf("%-8s kernel VFIO: %d container(s), group(s)%s; the kernel's pins are in VmLck\n",
                  "", p.vfio_containers, groups.empty() ? " none" : groups.c_str());
    }
  }
}

void print_json(const std::vector<ProcessStat>& processes) {
  std::vector<std::string> items;
  for (const ProcessStat& p : processes) {
    std::vector<std::string> owners;
    for (const OwnerStat& o : p.owners) {
      owners.push_back(JsonObject()
                           .add("mode", o.mode)
                           .add("id", o.id)
                           .add("charged_bytes", o.charged_bytes)
                           .add("limit_bytes", o.limit_bytes)
                           .str());
    }
    std::vector<std::string> groups;
    for (int g : p.vfio_groups) groups.push_back(std::to_string(g));
    items.push_back(JsonObject()
                        .add("pid", p.pid)
                        .add("command", p.command)
                        .add("pinned_bytes", p.pinned_bytes)
                        .add("simulated_pinned_bytes", p.simulated_pinned_bytes)
                        .raw("owners", json_array(owners))
                        .add("vmlck_bytes", p.vmlck_bytes)
                        .add("vmpin_bytes", p.vmpin_bytes)
                        .add("vfio_containers", p.vfio_containers)
                        .raw("vfio_groups", json_array(groups))
                        .str());
  }
  std::printf("%s\n", json_array(items, true).c_str());
}

}  // namespace

int run_stat(const StatOptions& options) {
  const std::vector<ProcessStat> processes = scan(options.pid);
  if (options.json) {
    print_json(processes);
  } else if (processes.empty()) {
    if (options.pid != 0) {
      std::printf("process %d is not running iomm (or its fds are not readable)\n", options.pid);
    } else {
      std::printf("no running iomm process found\n");
    }
  } else {
    print_table(processes);
  }
  return options.pid != 0 && processes.empty() ? 1 : 0;
}

}  // namespace iomm::cli
