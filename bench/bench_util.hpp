// Small helpers shared by the iomm benchmarks (bench/ only; not part of the
// library).
#pragma once

#include <benchmark/benchmark.h>
#include <linux/capability.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>

#include "iomm/ioas.hpp"
#include "iomm/result.hpp"

namespace iomm_bench {

inline constexpr uint64_t KiB = 1ULL << 10;
inline constexpr uint64_t MiB = 1ULL << 20;
inline constexpr uint64_t GiB = 1ULL << 30;

// "what: EINVAL: message" for a failed iomm call.
inline std::string describe(const char* what, const iomm::Error& e) {
  return std::string(what) + ": " + e.describe();
}

// Report a failed iomm call on stderr (so it survives in logs even when the
// benchmark output is aggregated) and mark the benchmark as failed.
inline void fail(benchmark::State& state, const std::string& msg) {
  std::fprintf(stderr, "BENCH ERROR: %s\n", msg.c_str());
  state.SkipWithError(msg.c_str());
}

// An IOAS with one software domain attached: the common start of the
// domain benchmarks. error is empty on success.
struct DomainSetup {
  std::shared_ptr<iomm::Ioas> ioas;
  std::shared_ptr<iomm::SoftDomain> domain;
  std::string error;
};

inline DomainSetup ioas_with_domain(const iomm::IoasOptions& options = {}) {
  DomainSetup d;
  auto ioas = iomm::Ioas::create(options);
  if (!ioas) {
    d.error = describe("Ioas::create", ioas.error());
    return d;
  }
  auto dom = iomm::SoftDomain::create({});
  if (!dom) {
    d.error = describe("SoftDomain::create", dom.error());
    return d;
  }
  if (auto s = (*ioas)->attach(*dom); !s) {
    d.error = describe("Ioas::attach", s.error());
    return d;
  }
  d.ioas = *ioas;
  d.domain = *dom;
  return d;
}

// --- CAP_IPC_LOCK in the calling thread's effective set -------------------
// The benchmark runs single-threaded benchmarks on the main thread, so these
// act on that thread only. Dropping from the effective set keeps the
// capability permitted, so it can be raised again.
inline bool set_ipc_lock_effective(bool on) {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};
  if (syscall(SYS_capget, &header, data) != 0) return false;
  auto& eff = data[CAP_TO_INDEX(CAP_IPC_LOCK)].effective;
  if (on) {
    if ((data[CAP_TO_INDEX(CAP_IPC_LOCK)].permitted & CAP_TO_MASK(CAP_IPC_LOCK)) == 0) return false;
    eff |= CAP_TO_MASK(CAP_IPC_LOCK);
  } else {
    eff &= ~CAP_TO_MASK(CAP_IPC_LOCK);
  }
  return syscall(SYS_capset, &header, data) == 0;
}

inline bool has_ipc_lock_effective() {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};
  if (syscall(SYS_capget, &header, data) != 0) return false;
  return (data[CAP_TO_INDEX(CAP_IPC_LOCK)].effective & CAP_TO_MASK(CAP_IPC_LOCK)) != 0;
}

// RAII: CAP_IPC_LOCK off for a scope.
class WithoutIpcLock {
 public:
  WithoutIpcLock() : had_(has_ipc_lock_effective()) { ok_ = set_ipc_lock_effective(false); }
  ~WithoutIpcLock() {
    if (had_) set_ipc_lock_effective(true);
  }
  WithoutIpcLock(const WithoutIpcLock&) = delete;
  WithoutIpcLock& operator=(const WithoutIpcLock&) = delete;
  [[nodiscard]] bool ok() const { return ok_; }

 private:
  bool had_;
  bool ok_ = false;
};

// --- /proc helpers -------------------------------------------------------
inline long meminfo_value(const std::string& key) {
  std::ifstream in("/proc/meminfo");
  std::string k;
  long v = -1;
  std::string unit;
  while (in >> k) {
    if (k == key + ":") {
      in >> v;
      return v;
    }
    std::getline(in, unit);
  }
  return -1;
}

inline long read_long_file(const char* path) {
  std::ifstream in(path);
  long v = -1;
  in >> v;
  return v;
}

inline bool write_long_file(const char* path, long v) {
  std::ofstream out(path);
  out << v;
  out.flush();
  return static_cast<bool>(out);
}

// Make sure `pages` 2 MiB huge pages are free, raising nr_hugepages if we
// may (root). Remembers the original value so restore_hugepages() can put it
// back. Returns false (with a reason) if they cannot be had.
struct HugepageState {
  long original = -1;
  bool raised = false;
};

inline HugepageState& hugepage_state() {
  static HugepageState s;
  return s;
}

inline bool ensure_free_hugepages(long pages, std::string* why) {
  if (meminfo_value("Hugepagesize") != 2048) {
    *why = "default huge page size is not 2 MiB";
    return false;
  }
  long free_pages = meminfo_value("HugePages_Free");
  if (free_pages >= pages) return true;
  const char* knob = "/proc/sys/vm/nr_hugepages";
  const long total = read_long_file(knob);
  if (total < 0) {
    *why = "cannot read /proc/sys/vm/nr_hugepages";
    return false;
  }
  HugepageState& hs = hugepage_state();
  if (!hs.raised) hs.original = total;
  if (!write_long_file(knob, total + (pages - free_pages))) {
    *why = "cannot raise /proc/sys/vm/nr_hugepages (not root?)";
    return false;
  }
  hs.raised = true;
  free_pages = meminfo_value("HugePages_Free");
  if (free_pages < pages) {
    *why = "only " + std::to_string(free_pages) +
           " free 2 MiB huge pages after raising nr_hugepages, need " + std::to_string(pages);
    return false;
  }
  return true;
}

inline void restore_hugepages() {
  HugepageState& hs = hugepage_state();
  if (hs.raised) {
    write_long_file("/proc/sys/vm/nr_hugepages", hs.original);
    hs.raised = false;
  }
}

}  // namespace iomm_bench
