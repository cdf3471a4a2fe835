// Ranked locks: every iomm mutex and reader-writer lock carries its place
// in the library's one lock order (docs/design.md, "Lock order", which is
// the source of truth; LockRank mirrors it and tests/lock_order_test.cpp
// checks the two agree). In debug builds (no NDEBUG: the asan preset)
// every acquisition checks, per thread, that the lock ranks strictly below
// every lock the thread already holds, and aborts naming both locks
// otherwise; a try-lock cannot deadlock and is only recorded. In other
// builds the wrappers are plain std::mutex / std::shared_mutex.
//
// Use them with std::lock_guard / std::unique_lock / std::shared_lock, and
// sync::CondVar for waits (a std::condition_variable on the wrapped mutex
// that keeps the record right across the wait; std::condition_variable_any
// would allocate at construction, and the IOAS and access constructors
// must not throw).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <shared_mutex>

namespace iomm::sync {

#ifdef NDEBUG
inline constexpr bool kLockOrderChecks = false;
#else
inline constexpr bool kLockOrderChecks = true;
#endif

// Outermost first. The numbers are the entries of the list in
// docs/design.md times ten; locks that share an entry get consecutive
// values in the order the code nests them.
enum class LockRank : uint16_t {
  compat_unmap_notifier = 0,  // 0. UnmapNotifier::mu_
  compat_container = 10,      // 1. compat::Container::mu
  compat_group_link = 20,     // 2. iomm_vfio_group::link_mu
  compat_fd_registry = 21,    //    FdRegistry::mu_
  notifier_tree = 30,         // 3. notify::Registry::tree_mu_
  ioas_accesses = 40,         // 4. IoasState::accesses_mu
  access_pins = 50,           // 5. AccessState::mu
  access_pages = 51,          //    AccessState::page_mu
  ioas_domains = 60,          // 6. IoasState::domains_mu
  ioas_tree = 70,             // 7. IoasState::tree_mu
  on_demand_fill = 75,        // 7b. ioas::OnDemand::mu
  pin_store = 80,             // 8. MemObject::mu_
  page_table_structure = 81,  //    PageTable::structure_mu_
  monitor_watches = 85,       // 8b. monitor::EventMonitor::mu_
  file_registry = 90,         // 9. the file registry's mutex
  file_window = 91,           //    FileObject::window_mu_
  user_object = 92,           //    UserObject::mu_
  compat_calls = 100,         // 10. leaves: Container::calls_mu_
  ioas_flight = 101,          //     IoasState::flight_mu
  owner_ledger = 102,         //     the owner ledger's mutex
  owner_source = 103,         //     Owner::source_mu_
  fault_log = 104,            //     FaultLog::mutex_
  notifier_seq = 105,         //     notify::Registry::seq_mu_
  notifier_node = 106,        //     notify::Node::mu
  monitor_start = 107,        //     the memory monitor's start mutex
  vring_cache = 108,          //     a VringCache's mu
  iotlb_caches = 109,         //     a domain's cache registry, domain::Iotlb::mu_
  table_pool = 110,           //     a page table's TablePool::mu_
};

namespace lock_order {
// Record an acquisition by this thread (checked unless `trying`) and its
// release. Debug builds only.
void acquired(LockRank rank, const char* name, const void* lock, bool trying) noexcept;
void released(const void* lock) noexcept;
}  // namespace lock_order

// What both kinds share: the exclusive side, every acquisition recorded
// (and checked unless it is a try) and every release.
template <typename Native>
class RankedLock {
 public:
  RankedLock(LockRank rank, const char* name) noexcept : rank_(rank), name_(name) {}
  RankedLock(const RankedLock&) = delete;
  RankedLock& operator=(const RankedLock&) = delete;

  void lock() {
    if constexpr (kLockOrderChecks) lock_order::acquired(rank_, name_, this, false);
    mu_.lock();
  }
  bool try_lock() {
    if (!mu_.try_lock()) return false;
    if constexpr (kLockOrderChecks) lock_order::acquired(rank_, name_, this, true);
    return true;
  }
  void unlock() {
    if constexpr (kLockOrderChecks) lock_order::released(this);
    mu_.unlock();
  }

 protected:
  ~RankedLock() = default;
  Native mu_;
  const LockRank rank_;
  const char* const name_;
};

class RankedMutex : public RankedLock<std::mutex> {
 public:
  using RankedLock::RankedLock;

 private:
  friend class CondVar;
};

// A condition variable for a RankedMutex held through a std::unique_lock.
// Waking up re-acquires the mutex, which is checked like any acquisition.
class CondVar {
 public:
  void notify_one() noexcept { cv_.notify_one(); }
  void notify_all() noexcept { cv_.notify_all(); }

  template <typename Pred>
  void wait(std::unique_lock<RankedMutex>& lk, Pred pred) {
    while (!pred()) wait_once(lk, nullptr);
  }
  void wait(std::unique_lock<RankedMutex>& lk) { wait_once(lk, nullptr); }
  // False if the deadline passed with pred still false.
  template <typename Pred>
  bool wait_until(std::unique_lock<RankedMutex>& lk, std::chrono::steady_clock::time_point deadline,
                  Pred pred) {
    while (!pred()) {
      if (std::chrono::steady_clock::now() >= deadline) return false;
      wait_once(lk, &deadline);
    }
    return true;
  }

 private:
  void wait_once(std::unique_lock<RankedMutex>& lk,
                 const std::chrono::steady_clock::time_point* until) {
    RankedMutex& m = *lk.mutex();
    if constexpr (kLockOrderChecks) lock_order::released(&m);
    std::unique_lock<std::mutex> native(m.mu_, std::adopt_lock);
    if (until != nullptr) {
      cv_.wait_until(native, *until);
    } else {
      cv_.wait(native);
    }
    native.release();
    if constexpr (kLockOrderChecks) lock_order::acquired(m.rank_, m.name_, &m, false);
  }

  std::condition_variable cv_;
};

class RankedSharedMutex : public RankedLock<std::shared_mutex> {
 public:
  using RankedLock::RankedLock;

  void lock_shared() {
    if constexpr (kLockOrderChecks) lock_order::acquired(rank_, name_, this, false);
    mu_.lock_shared();
  }
  bool try_lock_shared() {
    if (!mu_.try_lock_shared()) return false;
    if constexpr (kLockOrderChecks) lock_order::acquired(rank_, name_, this, true);
    return true;
  }
  void unlock_shared() {
    if constexpr (kLockOrderChecks) lock_order::released(this);
    mu_.unlock_shared();
  }
};

}  // namespace iomm::sync
