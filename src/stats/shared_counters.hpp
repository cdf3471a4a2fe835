// Process-wide counters readable from other processes.
//
// The pin and charge counters live in one page of a memfd named
// "iomm-counters", so a monitor (`iomm stat`) can find it through
// /proc/<pid>/fd, map it read-only and read the live values without any
// cooperation from this process. The layout below is that interface: it only
// grows at the end, and an incompatible change bumps kCountersVersion.
//
// Every field is a lock-free std::atomic with the layout of the plain integer,
// so a reader in another process sees whole values. Counting never fails: if
// the memfd cannot be created, the block lives in private memory and is not
// visible from outside. A forked child continues from a copy of the values in
// a block of its own.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "iomm/accounting.hpp"

namespace iomm::stats {

inline constexpr char kCountersMemfdName[] = "iomm-counters";
inline constexpr uint64_t kCountersMagic = 0x52544E434D4D4F49ULL;  // "IOMMCNTR" in memory (LE)
inline constexpr uint32_t kCountersVersion = 1;
inline constexpr size_t kOwnerSlots = 64;
inline constexpr size_t kCountersBytes = 4096;
// limit_pages of an owner that is unlimited or has not charged yet.
inline constexpr uint64_t kNoLimit = UINT64_MAX;

// OwnerSlot::mode values.
enum SlotMode : uint32_t { kSlotFree = 0, kSlotPerUser = 1, kSlotPerProcess = 2 };

struct OwnerSlot {
  std::atomic<uint32_t> mode;  // SlotMode; anything else means "being claimed"
  std::atomic<int32_t> id;     // uid or pid
  std::atomic<uint64_t> charged_pages;
  std::atomic<uint64_t> limit_pages;  // kNoLimit: unlimited or not known yet
};

struct SharedCounters {
  std::atomic<uint64_t> magic;  // written last, once the block is initialised
  std::atomic<uint32_t> version;
  std::atomic<int32_t> pid;
  std::atomic<uint64_t> pinned_pages;            // 4 KiB units
  std::atomic<uint64_t> simulated_pinned_pages;  // 4 KiB units
  OwnerSlot owners[kOwnerSlots];
};

static_assert(std::atomic<uint64_t>::is_always_lock_free);
static_assert(std::atomic<uint32_t>::is_always_lock_free);
static_assert(sizeof(std::atomic<uint64_t>) == sizeof(uint64_t));
static_assert(std::is_standard_layout_v<SharedCounters>);
static_assert(sizeof(SharedCounters) <= kCountersBytes);

// This process's block, created on first use.
SharedCounters& shared_counters();

// Claim a slot for a new owner and return its charge counter. Call once per
// owner: slots are never released, as owners live for the process. When the
// table is full, the counter is private to this process (not visible to
// monitors) but works the same.
std::atomic<uint64_t>& owner_charge_slot(AccountMode mode, int id);

// Record the owner's effective limit next to its charge counter, for
// monitors. No-op for a counter that is not in the table.
void publish_owner_limit(const std::atomic<uint64_t>& charge_slot,
                         std::optional<uint64_t> limit_pages) noexcept;

}  // namespace iomm::stats
