// Owners of locked-memory charges and the process-wide ledger of them.
//
// An Owner is one counter: a uid in per_user mode, a process in per_process
// mode. A process is its pid *and* its start time (/proc/<pid>/stat), so a
// pid reused by a new process is a new owner and does not inherit the old
// one's charges. charge() is a compare-and-swap loop against the limit, so
// concurrent chargers can never take the counter over it, and uncharge()
// never checks a limit. Owners live for the life of the process (there are
// few of them).
//
// The limit is configured, or else the RLIMIT_MEMLOCK of the owner's limit
// source: the owner process itself (per_process), or the process that last
// created a mapping charged to the uid (per_user). Each read is remembered,
// so a source that has exited keeps the limit it last had, as the kernel
// keeps reading a dead source task's rlimit.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "iomm/accounting.hpp"
#include "iomm/range.hpp"
#include "iomm/result.hpp"
#include "stats/shared_counters.hpp"
#include "sync/ranked_mutex.hpp"

namespace iomm::acct {

// A process that is still the same one: pid plus start time (clock ticks
// since boot). pid 0 means this process.
struct ProcessId {
  int pid = 0;
  uint64_t start_time = 0;
  friend bool operator==(const ProcessId&, const ProcessId&) = default;
};

// The identity of live process pid (0 = this one), or ESRCH when it does not
// exist. Never throws.
Result<ProcessId> process_id(int pid) noexcept;

class Owner {
 public:
  // process: the owner process (per_process) or the first limit source
  // (per_user).
  Owner(AccountMode mode, int id, ProcessId process)
      : mode_(mode),
        id_(id),
        process_(process),
        limit_source_(process),
        charged_(stats::owner_charge_slot(mode, id)) {}

  // Charge pages (4 KiB units). ENOMEM if it would exceed the limit. Never
  // throws.
  Status charge(uint64_t pages) noexcept;
  void uncharge(uint64_t pages) noexcept;

  [[nodiscard]] AccountMode mode() const noexcept { return mode_; }
  [[nodiscard]] int id() const noexcept { return id_; }
  [[nodiscard]] uint64_t charged_pages() const noexcept {
    return charged_.load(std::memory_order_relaxed);
  }
  // Limit in pages, nullopt when unlimited.
  [[nodiscard]] std::optional<uint64_t> limit_pages() const noexcept;
  void configure_limit(std::optional<uint64_t> bytes) noexcept;
  [[nodiscard]] bool limit_configured() const noexcept {
    return configured_.load(std::memory_order_relaxed) != kNotConfigured;
  }
  // per_user: the process whose RLIMIT_MEMLOCK applies from now on.
  void set_limit_source(ProcessId source) noexcept;

 private:
  static constexpr uint64_t kNotConfigured = UINT64_MAX;
  static constexpr uint64_t kUnlimited = UINT64_MAX;
  const AccountMode mode_;
  const int id_;
  const ProcessId process_;  // per_process: the owner itself
  mutable sync::RankedMutex source_mu_{sync::LockRank::owner_source,
                                       "acct::Owner::source_mu_"};  // a leaf
  ProcessId limit_source_;                                          // guarded by source_mu_
  // The source's RLIMIT_MEMLOCK in pages when last read (kUnlimited for
  // none), used once it has exited; guarded by source_mu_.
  mutable std::optional<uint64_t> last_rlimit_;
  // A slot of the shared counter block, so monitors can read the charge.
  std::atomic<uint64_t>& charged_;
  std::atomic<uint64_t> configured_{kNotConfigured};  // bytes
};

// The owner that pays for a mapping created now by the calling thread under
// `mode` for `spec`, or nullptr when nothing is charged (mode none, or the
// thread holds CAP_IPC_LOCK in its effective set). ESRCH: spec names a
// process that does not exist; ENOMEM: no memory for a new owner.
Result<std::shared_ptr<Owner>> owner_for_mapping(AccountMode mode, const OwnerSpec& spec) noexcept;

// The ledger's counter for (mode, id, process) (process is part of the key
// only in per_process mode), created on first use with process as its limit
// source; with take_as_limit_source, a per_user owner found again takes
// process as its limit source from now on. ENOMEM when it cannot be
// allocated.
Result<std::shared_ptr<Owner>> ledger_owner(AccountMode mode, int id, ProcessId process,
                                            bool take_as_limit_source) noexcept;
// Every owner (may throw std::bad_alloc, like iomm::counters()).
std::vector<std::shared_ptr<Owner>> ledger_owners();

// Whether the calling thread has CAP_IPC_LOCK in its effective set.
bool thread_has_ipc_lock() noexcept;

}  // namespace iomm::acct
