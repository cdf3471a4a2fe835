#include "acct/owner.hpp"

#include <linux/capability.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "core/check.hpp"
#include "fault/inject.hpp"

namespace iomm::acct {

namespace {

struct Ledger {
  std::mutex mu;
  std::map<std::pair<AccountMode, int>, std::shared_ptr<Owner>> owners;
};

Ledger& ledger() {
  static Ledger* instance = new Ledger();  // never destroyed: owners outlive static teardown
  return *instance;
}

}  // namespace

std::shared_ptr<Owner> ledger_owner(AccountMode mode, int id, int rlimit_pid) {
  Ledger& l = ledger();
  std::lock_guard lk(l.mu);
  auto& slot = l.owners[{mode, id}];
  if (!slot) slot = std::make_shared<Owner>(mode, id, rlimit_pid);
  return slot;
}

std::vector<std::shared_ptr<Owner>> ledger_owners() {
  Ledger& l = ledger();
  std::lock_guard lk(l.mu);
  std::vector<std::shared_ptr<Owner>> out;
  out.reserve(l.owners.size());
  for (const auto& [key, owner] : l.owners) out.push_back(owner);
  return out;
}

Status Owner::charge(uint64_t pages) {
  if (pages == 0) return {};
  if (IOMM_INJECT("acct.charge")) return Error(ENOMEM, "memlock limit exceeded (injected)");
  const std::optional<uint64_t> limit = limit_pages();
  stats::publish_owner_limit(charged_, limit);
  uint64_t cur = charged_.load(std::memory_order_relaxed);
  for (;;) {
    uint64_t next = 0;
    if (__builtin_add_overflow(cur, pages, &next) || (limit && next > *limit)) {
      return Error(ENOMEM, "memlock limit exceeded: " + std::string(to_string(mode_)) + " owner " +
                               std::to_string(id_) + " has " + std::to_string(cur * kPageSize) +
                               " bytes charged, needs " + std::to_string(pages * kPageSize) +
                               " more, limit " + std::to_string(limit.value_or(0) * kPageSize));
    }
    if (charged_.compare_exchange_weak(cur, next, std::memory_order_relaxed)) return {};
  }
}

void Owner::uncharge(uint64_t pages) noexcept {
  if (pages == 0) return;
  [[maybe_unused]] const uint64_t before = charged_.fetch_sub(pages, std::memory_order_relaxed);
  IOMM_CHECK(before >= pages, "charge underflow");
}

std::optional<uint64_t> Owner::limit_pages() const {
  const uint64_t configured = configured_.load(std::memory_order_relaxed);
  if (configured != kNotConfigured) return configured / kPageSize;
  struct rlimit lim {};
  if (prlimit(rlimit_pid_, RLIMIT_MEMLOCK, nullptr, &lim) != 0) return 0;  // owner gone: nothing
  if (lim.rlim_cur == RLIM_INFINITY) return std::nullopt;
  return lim.rlim_cur / kPageSize;
}

void Owner::configure_limit(std::optional<uint64_t> bytes) noexcept {
  configured_.store(bytes ? std::min(*bytes, kNotConfigured - 1) : kNotConfigured,
                    std::memory_order_relaxed);
}

bool thread_has_ipc_lock() noexcept {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};
  if (syscall(SYS_capget, &header, data) != 0) return false;
  return (data[CAP_TO_INDEX(CAP_IPC_LOCK)].effective & CAP_TO_MASK(CAP_IPC_LOCK)) != 0;
}

Result<std::shared_ptr<Owner>> owner_for_mapping(AccountMode mode, const OwnerSpec& spec) {
  if (mode == AccountMode::none || thread_has_ipc_lock()) return std::shared_ptr<Owner>();
  const int pid = spec.pid == 0 ? static_cast<int>(getpid()) : spec.pid;
  if (mode == AccountMode::per_process) return ledger_owner(mode, pid, spec.pid);
  int uid = spec.uid;
  if (uid < 0) {
    if (spec.pid == 0) {
      uid = static_cast<int>(getuid());
    } else {
      struct stat st {};
      const std::string path = "/proc/" + std::to_string(spec.pid);
      if (stat(path.c_str(), &st) != 0) return Error(ESRCH, "owner process " + path + " is gone");
      uid = static_cast<int>(st.st_uid);
    }
  }
  return ledger_owner(mode, uid, spec.pid);
}

}  // namespace iomm::acct

namespace iomm {

const char* to_string(AccountMode mode) noexcept {
  switch (mode) {
    case AccountMode::none:
      return "none";
    case AccountMode::per_user:
      return "per-user";
    case AccountMode::per_process:
      return "per-process";
  }
  return "?";
}

Status set_memlock_limit(AccountMode mode, int id, std::optional<uint64_t> bytes) {
  if (mode == AccountMode::none) return Error(EINVAL, "accounting mode none has no limit");
  if (id < 0) return Error(EINVAL, "owner id must not be negative");
  if (id == 0) id = mode == AccountMode::per_user ? static_cast<int>(getuid()) : getpid();
  const bool other_process = mode == AccountMode::per_process && id != getpid();
  acct::ledger_owner(mode, id, other_process ? id : 0)->configure_limit(bytes);
  return {};
}

}  // namespace iomm
