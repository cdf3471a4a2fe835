// This process's virtual memory as a backing object. mlock is per address,
// not counted, so all user-memory pins in the process must share one pin
// store: there is exactly one UserObject.
//
// Not counted also means one munlock undoes the application's own mlock (or
// mlockall) of the same pages. So before locking a run we note which of its
// pages the kernel already holds locked, and unlocking skips them.
#include <sys/mman.h>

#include <algorithm>
#include <cstddef>
#include <iterator>
#include <map>
#include <mutex>
#include <new>
#include <vector>

#include "mem/checked_copy.hpp"
#include "mem/mem_object.hpp"
#include "mem/populate.hpp"
#include "mem/vma_locks.hpp"
#include "sync/ranked_mutex.hpp"

namespace iomm::mem {

namespace {

void* address_of(uint64_t page) noexcept { return reinterpret_cast<void*>(page << kPageShift); }
uint64_t bytes_of(uint64_t first, uint64_t last) noexcept {
  return (last - first + 1) << kPageShift;
}

class UserObject final : public MemObject {
 public:
  UserObject() : MemObject(SourceKind::user, kPageShift) {}

  [[nodiscard]] uint64_t dma_address(uint64_t offset) const noexcept override { return offset; }
  [[nodiscard]] void* host(uint64_t offset) const noexcept override {
    return reinterpret_cast<void*>(offset);
  }
  // The addresses are whatever the caller named: they may be unmapped or
  // read-only by the time a device or an access copies.
  [[nodiscard]] HostAccess host_access() const noexcept override { return HostAccess::checked; }

  // mincore fails with ENOMEM on any unmapped page of the range, and has
  // no side effect: the cheapest "is it mapped" probe there is.
  [[nodiscard]] bool present(uint64_t offset, uint64_t length) const noexcept override {
    const uint64_t first = offset & ~(kPageSize - 1);
    uint64_t end = 0;
    if (__builtin_add_overflow(offset, length, &end)) return false;
    constexpr uint64_t kPagesPerCall = 256;
    unsigned char vec[kPagesPerCall];
    for (uint64_t pos = first; pos < end;) {
      const uint64_t n = std::min<uint64_t>(kPagesPerCall << kPageShift, end - pos);
      if (::mincore(reinterpret_cast<void*>(pos), n, vec) != 0) return false;
      pos += n;
    }
    return true;
  }

  bool copy_out(uint64_t offset, void* buf, size_t n) const noexcept override {
    return checked_read(buf, offset, n);
  }
  bool copy_in(uint64_t offset, const void* buf, size_t n) const noexcept override {
    return checked_write(offset, buf, n);
  }

 protected:
  Status lock_granules(uint64_t first, uint64_t last, bool write) override {
    Result<std::vector<PageRun>> already_locked = vm_locked_runs(first, last);
    if (!already_locked.ok()) return already_locked.error();
    if (Status st = remember_application_locks(first, last, *already_locked); !st) return st;
    Status locked = populate_and_lock(address_of(first), bytes_of(first, last), write);
    if (!locked) unlock_ours(first, last);
    return locked;
  }

  void unlock_granules(uint64_t first, uint64_t last) noexcept override {
    unlock_ours(first, last);
    forget_application_locks(first, last);
  }

  Status confirm_writable(uint64_t first, uint64_t last) override {
    return populate_writable(address_of(first), bytes_of(first, last));
  }

 private:
  // Make [first, last] of application_locked_ equal to runs. The pin store
  // hands us each granule exclusively, so nobody else reads or writes this
  // part of the map meanwhile.
  Status remember_application_locks(uint64_t first, uint64_t last,
                                    const std::vector<PageRun>& runs) {
    const std::lock_guard lock(mu_);
    try {
      split_at(first);
      if (last + 1 != 0) split_at(last + 1);
      application_locked_.erase(application_locked_.lower_bound(first),
                                application_locked_.upper_bound(last));
      for (const PageRun& run : runs) application_locked_.emplace(run.first, run.last);
    } catch (const std::bad_alloc&) {
      // What is left in [first, last] describes pages nobody holds: it is
      // rewritten by the next lock of these pages and never read before.
      return Error(ENOMEM, "out of memory recording the application's own mlocks");
    }
    return {};
  }

  // Make a record boundary at page k (may allocate one node).
  void split_at(uint64_t k) {
    auto it = application_locked_.lower_bound(k);
    if (it == application_locked_.begin()) return;
    --it;
    if (it->second < k) return;
    application_locked_.emplace(k, it->second);
    it->second = k - 1;
  }

  // munlock the pages of [first, last] that the application had not locked
  // itself when we locked them. One gap at a time, so the syscalls run
  // without mu_.
  void unlock_ours(uint64_t first, uint64_t last) noexcept {
    uint64_t cursor = first;
    while (cursor <= last) {
      uint64_t gap_last = last;
      {
        const std::lock_guard lock(mu_);
        auto next = application_locked_.upper_bound(cursor);
        if (next != application_locked_.begin()) {
          const auto covering = std::prev(next);
          if (covering->second >= cursor) {
            if (covering->second >= last) return;
            cursor = covering->second + 1;
            continue;
          }
        }
        if (next != application_locked_.end() && next->first <= last) gap_last = next->first - 1;
      }
      unlock_range(address_of(cursor), bytes_of(cursor, gap_last));
      if (gap_last == last) return;
      cursor = gap_last + 1;
    }
  }

  // Drop the records of [first, last] without allocating: whole records are
  // erased and ends trimmed. A record reaching past both ends keeps its
  // middle, which is rewritten before it is read again.
  void forget_application_locks(uint64_t first, uint64_t last) noexcept {
    const std::lock_guard lock(mu_);
    auto it = application_locked_.upper_bound(first);
    if (it != application_locked_.begin()) {
      const auto before = std::prev(it);
      if (before->first < first && before->second >= first) {
        if (before->second > last) return;
        before->second = first - 1;
      }
    }
    it = application_locked_.lower_bound(first);
    while (it != application_locked_.end() && it->first <= last) {
      if (it->second <= last) {
        it = application_locked_.erase(it);
        continue;
      }
      auto node = application_locked_.extract(it);
      node.key() = last + 1;
      application_locked_.insert(std::move(node));
      break;
    }
  }

  sync::RankedMutex mu_{sync::LockRank::user_object, "UserObject::mu_"};
  // Runs of pages (first -> last) that were already locked by the
  // application when we locked them.
  std::map<uint64_t, uint64_t> application_locked_;
};

}  // namespace

std::shared_ptr<MemObject> user_object() {
  static auto* instance = new std::shared_ptr<MemObject>(std::make_shared<UserObject>());
  return *instance;
}

}  // namespace iomm::mem
