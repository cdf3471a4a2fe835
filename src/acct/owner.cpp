#include "acct/owner.hpp"

#include <fcntl.h>
#include <linux/capability.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <new>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/check.hpp"
#include "fault/inject.hpp"
#include "sync/ranked_mutex.hpp"

namespace iomm::acct {

namespace {

// An Error whose message could not be allocated keeps its code: these calls
// promise not to throw.
Error error_of(int code, const char* message) noexcept {
  try {
    return Error(code, message);
  } catch (const std::bad_alloc&) {
    return Error(code, std::string());
  }
}

struct Ledger {
  sync::RankedMutex mu{sync::LockRank::owner_ledger, "acct owner ledger mu"};
  // (mode, id, start time of a per_process owner; 0 for per_user)
  std::map<std::tuple<AccountMode, int, uint64_t>, std::shared_ptr<Owner>> owners;
};

Ledger& ledger() {
  static Ledger* instance = new Ledger();  // never destroyed: owners outlive static teardown
  return *instance;
}

// Field 22 of /proc/<pid>/stat, read without allocating; 0 if unreadable.
uint64_t start_time_of(int pid) noexcept {
  char path[32];
  std::snprintf(path, sizeof(path), "/proc/%d/stat", pid);
  const int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char buf[1024];
  const ssize_t n = read(fd, buf, sizeof(buf) - 1);
  close(fd);
  if (n <= 0) return 0;
  buf[n] = '\0';
  // The command name (field 2) may hold spaces and parentheses: fields
  // resume after its last ')'.
  const char* p = nullptr;
  for (ssize_t i = n - 1; i >= 0; --i) {
    if (buf[i] == ')') {
      p = buf + i + 1;
      break;
    }
  }
  if (p == nullptr) return 0;
  for (int field = 3; field < 22; ++field) {
    while (*p == ' ') ++p;
    while (*p != ' ' && *p != '\0') ++p;
  }
  char* end = nullptr;
  const uint64_t start = std::strtoull(p, &end, 10);
  return end == p ? 0 : start;
}

// RLIMIT_MEMLOCK of pid (0 = this process) in pages, kUnlimited for none.
std::optional<uint64_t> read_rlimit(int pid, uint64_t unlimited) noexcept {
  struct rlimit lim {};
  if (prlimit(pid, RLIMIT_MEMLOCK, nullptr, &lim) != 0) return std::nullopt;
  return lim.rlim_cur == RLIM_INFINITY ? unlimited : lim.rlim_cur / kPageSize;
}

}  // namespace

// This process's start time, read once per process (a forked child has
// another pid and reads its own). 1 when /proc cannot tell: this process
// exists whatever /proc says.
uint64_t own_start_time() noexcept {
  static std::atomic<int> cached_pid{0};
  static std::atomic<uint64_t> cached_start{0};
  const int pid = static_cast<int>(getpid());
  if (cached_pid.load(std::memory_order_acquire) == pid) {
    return cached_start.load(std::memory_order_relaxed);
  }
  const uint64_t start = std::max<uint64_t>(start_time_of(pid), 1);
  cached_start.store(start, std::memory_order_relaxed);
  cached_pid.store(pid, std::memory_order_release);
  return start;
}

Result<ProcessId> process_id(int pid) noexcept {
  if (pid == 0 || pid == static_cast<int>(getpid())) return ProcessId{0, own_start_time()};
  const uint64_t start = start_time_of(pid);
  if (start == 0) return error_of(ESRCH, "the owner process does not exist");
  return ProcessId{pid, start};
}

Result<std::shared_ptr<Owner>> ledger_owner(AccountMode mode, int id, ProcessId process,
                                            bool take_as_limit_source) noexcept {
  std::shared_ptr<Owner> owner;
  bool fresh = false;
  try {
    Ledger& l = ledger();
    std::lock_guard lk(l.mu);
    const auto key =
        std::make_tuple(mode, id, mode == AccountMode::per_process ? process.start_time : 0);
    auto it = l.owners.find(key);
    if (it == l.owners.end()) {
      auto created = std::make_shared<Owner>(mode, id, process);
      it = l.owners.emplace(key, std::move(created)).first;
      fresh = true;
    }
    owner = it->second;
  } catch (const std::bad_alloc&) {
    return error_of(ENOMEM, "out of memory");
  }
  if (!fresh && take_as_limit_source && mode == AccountMode::per_user) {
    owner->set_limit_source(process);
  }
  // Remember the source's limit while it is alive.
  (void)owner->limit_pages();
  return owner;
}

std::vector<std::shared_ptr<Owner>> ledger_owners() {
  Ledger& l = ledger();
  std::lock_guard lk(l.mu);
  std::vector<std::shared_ptr<Owner>> out;
  out.reserve(l.owners.size());
  for (const auto& [key, owner] : l.owners) out.push_back(owner);
  return out;
}

Status Owner::charge(uint64_t pages) noexcept {
  if (pages == 0) return {};
  if (IOMM_INJECT("acct.charge")) return error_of(ENOMEM, "memlock limit exceeded (injected)");
  const std::optional<uint64_t> limit = limit_pages();
  stats::publish_owner_limit(charged_, limit);
  uint64_t cur = charged_.load(std::memory_order_relaxed);
  for (;;) {
    uint64_t next = 0;
    if (__builtin_add_overflow(cur, pages, &next) || (limit && next > *limit)) {
      try {
        return Error(ENOMEM, "memlock limit exceeded: " + std::string(to_string(mode_)) +
                                 " owner " + std::to_string(id_) + " has " +
                                 std::to_string(cur * kPageSize) + " bytes charged, needs " +
                                 std::to_string(pages * kPageSize) + " more, limit " +
                                 std::to_string(limit.value_or(0) * kPageSize));
      } catch (const std::bad_alloc&) {
        return Error(ENOMEM, std::string());
      }
    }
    if (charged_.compare_exchange_weak(cur, next, std::memory_order_relaxed)) return {};
  }
}

void Owner::uncharge(uint64_t pages) noexcept {
  if (pages == 0) return;
  [[maybe_unused]] const uint64_t before = charged_.fetch_sub(pages, std::memory_order_relaxed);
  IOMM_CHECK(before >= pages, "charge underflow");
}

std::optional<uint64_t> Owner::limit_pages() const noexcept {
  const uint64_t configured = configured_.load(std::memory_order_relaxed);
  if (configured != kNotConfigured) return configured / kPageSize;
  ProcessId source;
  {
    std::lock_guard lk(source_mu_);
    source = limit_source_;
  }
  std::optional<uint64_t> now = read_rlimit(source.pid, kUnlimited);
  // A pid is only the source while its start time matches (checked after
  // the read: a reused pid answers for someone else).
  if (now && source.pid != 0 && start_time_of(source.pid) != source.start_time) now.reset();
  std::lock_guard lk(source_mu_);
  if (now && limit_source_ == source) last_rlimit_ = now;
  // Gone: the limit it last had (0 if it was never read: nothing to go by).
  const uint64_t pages = now.value_or(last_rlimit_.value_or(0));
  if (pages == kUnlimited) return std::nullopt;
  return pages;
}

void Owner::set_limit_source(ProcessId source) noexcept {
  std::lock_guard lk(source_mu_);
  if (limit_source_ == source) return;
  limit_source_ = source;
  last_rlimit_.reset();
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

Result<std::shared_ptr<Owner>> owner_for_mapping(AccountMode mode, const OwnerSpec& spec) noexcept {
  if (mode == AccountMode::none || thread_has_ipc_lock()) return std::shared_ptr<Owner>();
  auto process = process_id(spec.pid);
  if (!process.ok()) return std::move(process).error();
  if (mode == AccountMode::per_process) {
    const int pid = process->pid == 0 ? static_cast<int>(getpid()) : process->pid;
    return ledger_owner(mode, pid, *process, true);
  }
  int uid = spec.uid;
  if (uid < 0) {
    if (process->pid == 0) {
      uid = static_cast<int>(getuid());
    } else {
      char path[32];
      std::snprintf(path, sizeof(path), "/proc/%d", process->pid);
      struct stat st {};
      if (stat(path, &st) != 0) return error_of(ESRCH, "the owner process does not exist");
      uid = static_cast<int>(st.st_uid);
    }
  }
  return ledger_owner(mode, uid, *process, true);
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
  if (mode == AccountMode::none) return acct::error_of(EINVAL, "accounting mode none has no limit");
  if (id < 0) return acct::error_of(EINVAL, "owner id must not be negative");
  // per_user: the uid's counter (created with this process as its limit
  // source); per_process: the process that has pid id now.
  auto process = acct::process_id(mode == AccountMode::per_user ? 0 : id);
  if (!process.ok()) return process.error();
  int key = id;
  if (mode == AccountMode::per_user && id == 0) key = static_cast<int>(getuid());
  if (mode == AccountMode::per_process && process->pid == 0) key = static_cast<int>(getpid());
  auto owner = acct::ledger_owner(mode, key, *process, false);
  if (!owner.ok()) return owner.error();
  (*owner)->configure_limit(bytes);
  return {};
}

}  // namespace iomm
