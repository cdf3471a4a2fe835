#include "stats/shared_counters.hpp"

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <deque>
#include <mutex>
#include <new>

namespace iomm::stats {

namespace {

// OwnerSlot::mode while a claimer fills in the slot; monitors skip it.
constexpr uint32_t kSlotClaiming = UINT32_MAX;

struct Block {
  SharedCounters* counters = nullptr;
  int fd = -1;  // -1: the block is private to this process
};

int create_memfd() noexcept {
  const int fd = memfd_create(kCountersMemfdName, MFD_CLOEXEC);
  if (fd < 0) return -1;
  if (ftruncate(fd, kCountersBytes) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

void* map_memfd(int fd) noexcept {
  void* addr = mmap(nullptr, kCountersBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  return addr == MAP_FAILED ? nullptr : addr;
}

void stamp_header(SharedCounters& c) noexcept {
  c.version.store(kCountersVersion, std::memory_order_relaxed);
  c.pid.store(static_cast<int32_t>(getpid()), std::memory_order_relaxed);
  // Release: a monitor that sees the magic sees an initialised block.
  c.magic.store(kCountersMagic, std::memory_order_release);
}

// Filled once by block(); the fork handler reads it directly so it never
// waits on block()'s initialisation guard.
constinit Block g_block;

// After fork the child would share the parent's page (MAP_SHARED) while
// holding its own copy of the library state, and the two would corrupt each
// other's counts. Give the child a fresh memfd carrying a copy of the values,
// moved over the same address so every reference into the block stays valid.
// The child is single-threaded here, so a plain copy is consistent.
void detach_child_block() noexcept {
  Block& b = g_block;
  if (b.fd < 0) return;
  close(b.fd);
  b.fd = create_memfd();
  void* fresh = b.fd >= 0 ? map_memfd(b.fd) : nullptr;
  if (fresh == nullptr) {
    if (b.fd >= 0) close(b.fd);
    b.fd = -1;
    fresh =
        mmap(nullptr, kCountersBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (fresh == MAP_FAILED) return;
  }
  std::memcpy(fresh, static_cast<void*>(b.counters), kCountersBytes);
  if (mremap(fresh, kCountersBytes, kCountersBytes, MREMAP_MAYMOVE | MREMAP_FIXED, b.counters) ==
      MAP_FAILED) {
    munmap(fresh, kCountersBytes);
    return;
  }
  b.counters->pid.store(static_cast<int32_t>(getpid()), std::memory_order_relaxed);
}

Block create_block() noexcept {
  Block b;
  b.fd = create_memfd();
  if (b.fd >= 0) {
    if (void* addr = map_memfd(b.fd)) {
      b.counters = new (addr) SharedCounters();
    } else {
      close(b.fd);
      b.fd = -1;
    }
  }
  if (b.counters == nullptr) {
    static SharedCounters private_block{};
    b.counters = &private_block;
  }
  stamp_header(*b.counters);
  return b;
}

Block& block() {
  [[maybe_unused]] static const bool created = [] {
    g_block = create_block();
    if (g_block.fd >= 0) pthread_atfork(nullptr, nullptr, detach_child_block);
    return true;
  }();
  return g_block;
}

}  // namespace

SharedCounters& shared_counters() { return *block().counters; }

std::atomic<uint64_t>& owner_charge_slot(AccountMode mode, int id) {
  const uint32_t slot_mode = mode == AccountMode::per_user      ? kSlotPerUser
                             : mode == AccountMode::per_process ? kSlotPerProcess
                                                                : kSlotFree;
  if (slot_mode != kSlotFree) {
    for (OwnerSlot& slot : shared_counters().owners) {
      uint32_t expected = kSlotFree;
      if (!slot.mode.compare_exchange_strong(expected, kSlotClaiming, std::memory_order_acquire)) {
        continue;
      }
      slot.id.store(id, std::memory_order_relaxed);
      slot.charged_pages.store(0, std::memory_order_relaxed);
      slot.limit_pages.store(kNoLimit, std::memory_order_relaxed);
      slot.mode.store(slot_mode, std::memory_order_release);
      return slot.charged_pages;
    }
  }
  // Owners live for the process, and so do their counters (a deque keeps the
  // references stable as it grows).
  static auto* overflow_mu = new std::mutex();
  static auto* overflow = new std::deque<std::atomic<uint64_t>>();
  std::lock_guard lock(*overflow_mu);
  return overflow->emplace_back(0);
}

void publish_owner_limit(const std::atomic<uint64_t>& charge_slot,
                         std::optional<uint64_t> limit_pages) noexcept {
  for (OwnerSlot& slot : shared_counters().owners) {
    if (&slot.charged_pages == &charge_slot) {
      slot.limit_pages.store(limit_pages.value_or(kNoLimit), std::memory_order_relaxed);
      return;
    }
  }
}

}  // namespace iomm::stats
