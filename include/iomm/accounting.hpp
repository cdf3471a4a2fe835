// Locked-memory accounting (seed 000).
//
// Contract
// - Every pinned page is charged to an owner before the call that pinned it
//   returns; nothing is deferred. Charging is a compare-and-swap against the
//   owner's limit and happens *before* the page is locked, so the charge never
//   exceeds the limit, even transiently, and never goes negative.
// - A page (see source.hpp for identity) is charged once per owner, however
//   many mappings, address spaces, domains or accesses hold it. The kernel's
//   type1 and iommufd charge per mapping; iomm does not.
// - Modes: none (nothing charged), per_user (one counter per uid, like
//   iommufd's default) and per_process (one counter per process, like type1
//   and iommufd's MM mode). A process is its pid and its start time: a pid
//   reused by a new process is a new owner, with no charge and no configured
//   limit from the old one. Naming a process that does not exist is ESRCH.
// - The limit is configured here, or else the RLIMIT_MEMLOCK (read at charge
//   time; for another process via prlimit) of the owner process
//   (per_process) or of the process that last created a mapping charged to
//   the uid (per_user). A process that has exited keeps the limit it had
//   when last read, as the kernel keeps reading a dead source task's
//   rlimit. CAP_IPC_LOCK in the effective set of the mapping thread,
//   captured at map time, makes that mapping's pages uncharged.
// - No call here throws: running out of memory is ENOMEM (counters() is a
//   query and may throw std::bad_alloc, see result.hpp).
// - Counters are process-wide: the library is one accounting domain per
//   process, as the kernel is one per machine.
// - Thread-safe.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "iomm/export.hpp"
#include "iomm/result.hpp"

namespace iomm {

enum class AccountMode { none, per_user, per_process };

IOMM_API const char* to_string(AccountMode mode) noexcept;

// Whose memlock budget pays for a mapping's pins.
struct IOMM_API OwnerSpec {
  int pid = 0;   // 0 = this process; else a live process (ESRCH otherwise)
  int uid = -1;  // -1 = the uid of pid (this process's real uid)
};

// Configure (or with nullopt, clear) the limit in bytes for one owner
// counter, overriding RLIMIT_MEMLOCK. id is a uid in per_user mode and a pid
// in per_process mode (0 = this process / its uid): the process that has
// that pid now. EINVAL for mode none or a negative id; ESRCH no such
// process; ENOMEM no memory for a new owner.
IOMM_API Status set_memlock_limit(AccountMode mode, int id, std::optional<uint64_t> bytes);

struct IOMM_API OwnerCounters {
  AccountMode mode;
  int id;  // uid or pid
  uint64_t charged_bytes;
  std::optional<uint64_t> limit_bytes;  // nullopt = unlimited
};

struct IOMM_API Counters {
  uint64_t pinned_bytes = 0;  // distinct pages held resident (4 KiB units)
  // Bytes locked in memory as the kernel counts them for this process
  // (VmLck in /proc/self/status), read at snapshot time.
  uint64_t vmlck_bytes = 0;
  uint64_t simulated_pinned_bytes = 0;  // pinned synthetic pages (no memory)
  uint64_t charged_bytes = 0;           // sum over owners
  std::vector<OwnerCounters> owners;    // owners with a non-zero charge or a configured limit
};

// A consistent-enough snapshot (each counter is read atomically).
IOMM_API Counters counters();

// VmLck of this process in bytes (what the kernel counts as mlocked).
IOMM_API uint64_t process_vmlck_bytes();

}  // namespace iomm
