// Owners of locked-memory charges and the process-wide ledger of them.
//
// An Owner is one counter (a uid in per_user mode, a pid in per_process
// mode). charge() is a compare-and-swap loop against the limit, so concurrent
// chargers can never take the counter over it, and uncharge() never checks a
// limit. Owners live for the life of the process (there are few of them).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "iomm/accounting.hpp"
#include "iomm/range.hpp"
#include "iomm/result.hpp"
#include "stats/shared_counters.hpp"

namespace iomm::acct {

class Owner {
 public:
  Owner(AccountMode mode, int id, int rlimit_pid)
      : mode_(mode),
        id_(id),
        rlimit_pid_(rlimit_pid),
        charged_(stats::owner_charge_slot(mode, id)) {}

  // Charge pages (4 KiB units). ENOMEM if it would exceed the limit.
  Status charge(uint64_t pages);
  void uncharge(uint64_t pages) noexcept;

  [[nodiscard]] AccountMode mode() const noexcept { return mode_; }
  [[nodiscard]] int id() const noexcept { return id_; }
  [[nodiscard]] uint64_t charged_pages() const noexcept {
    return charged_.load(std::memory_order_relaxed);
  }
  // Limit in pages, nullopt when unlimited.
  [[nodiscard]] std::optional<uint64_t> limit_pages() const;
  void configure_limit(std::optional<uint64_t> bytes) noexcept;
  [[nodiscard]] bool limit_configured() const noexcept {
    return configured_.load(std::memory_order_relaxed) != kNotConfigured;
  }

 private:
  static constexpr uint64_t kNotConfigured = UINT64_MAX;
  const AccountMode mode_;
  const int id_;
  const int rlimit_pid_;  // whose RLIMIT_MEMLOCK applies; 0 = this process
  // A slot of the shared counter block, so monitors can read the charge.
  std::atomic<uint64_t>& charged_;
  std::atomic<uint64_t> configured_{kNotConfigured};  // bytes
};

// The owner that pays for a mapping created now by the calling thread under
// `mode` for `spec`, or nullptr when nothing is charged (mode none, or the
// thread holds CAP_IPC_LOCK in its effective set).
Result<std::shared_ptr<Owner>> owner_for_mapping(AccountMode mode, const OwnerSpec& spec);

// The ledger's counter for (mode, id), created on first use. rlimit_pid is
// the process whose RLIMIT_MEMLOCK applies (0 = this one).
std::shared_ptr<Owner> ledger_owner(AccountMode mode, int id, int rlimit_pid);
std::vector<std::shared_ptr<Owner>> ledger_owners();

// Whether the calling thread has CAP_IPC_LOCK in its effective set.
bool thread_has_ipc_lock() noexcept;

}  // namespace iomm::acct
