// The VFIO type1 container over an IOAS (see include/iomm/vfio_compat.h).
//
// Type1's rules live here and in the ioctl layer only: the core IOAS, domain
// and access know nothing of vfio_dma records, v1 unmap or dma_avail.
//
// Locking (outermost first):
//   Container::mu (type1's iommu->lock): held by every container operation,
//     but never across a call that can run a driver's dma_unmap callback. An
//     unmap marks its victims `unmapping` under mu, drops it for the IOAS
//     unmap (which calls the callbacks), then retakes it to finish.
//   iomm_vfio_group::link_mu: the group's link to its container and access;
//     taken under mu by attach/detach, alone by the mediated entry points.
//   The IOAS's own locks (domains_mu, tree_mu, ...), taken inside the calls.
//   UnmapNotifier::mu: held (shared) while a callback runs; a group destroy
//     takes it exclusively, after every lock above is released.
// Lifetimes: every entry point that reaches a container registers itself in
// Container::calls (enter/leave); closing the container waits for them.
// Mediated entry points snapshot the access shared_ptr under link_mu, so a
// concurrent detach cannot free it under them.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <thread>
#include <utility>
#include <vector>

#include "compat/fd_registry.hpp"
#include "compat/vaddr.hpp"
#include "iomm/access.hpp"
#include "iomm/domain.hpp"
#include "iomm/ioas.hpp"
#include "iomm/result.hpp"
#include "iomm/vfio_compat.h"
#include "sync/ranked_mutex.hpp"

namespace iomm::compat {

// One MAP_DMA (type1's vfio_dma).
struct Dma {
  uint64_t iova;
  uint64_t size;
  uint64_t vaddr;
  uint32_t prot;
  bool vaddr_invalid = false;
  Backing backing;
  // The thread of the unmap that dropped Container::mu to notify drivers
  // and is removing it (none: not being removed). The mapping stays visible
  // (EEXIST to a MAP, DMA_AVAIL counts it) until that unmap finishes.
  std::thread::id unmapper{};
  [[nodiscard]] bool unmapping() const { return unmapper != std::thread::id{}; }
};

// The driver's dma_unmap callback, shared with the access's callback so that
// destroying the group can stop it: after stop() returns no call is running
// and none will start, even if an entry point still holds the access.
class UnmapNotifier {
 public:
  UnmapNotifier(iomm_vfio_dma_unmap_fn fn, void* opaque) : fn_(fn), opaque_(opaque) {}
  void notify(uint64_t iova, uint64_t size);
  void stop() noexcept;

 private:
  sync::RankedSharedMutex mu_{sync::LockRank::compat_unmap_notifier, "UnmapNotifier::mu_"};
  bool live_ = true;  // mu_
  const iomm_vfio_dma_unmap_fn fn_;
  void* const opaque_;
};

class Container;

}  // namespace iomm::compat

struct iomm_vfio_group {
  bool mediated = false;
  iomm::sync::RankedMutex link_mu{iomm::sync::LockRank::compat_group_link,
                                  "iomm_vfio_group::link_mu"};
  // Set at creation; cleared by closing the container (under its mu).
  iomm::compat::Container* container = nullptr;  // link_mu
  // software
  iomm::DomainConfig config;
  uint64_t pgsize_bitmap = 0;
  std::shared_ptr<iomm::SoftDomain> domain;
  std::atomic<bool> attached{false};
  // mediated
  std::shared_ptr<iomm::compat::UnmapNotifier> notifier;
  // Set while the IOMMU is set; written under the container's mu and
  // link_mu, read under either.
  std::shared_ptr<iomm::Access> access;
};

namespace iomm::compat {

class Container {
 public:
  ~Container();

  Result<long> check_extension(unsigned long ext);
  Status set_iommu(unsigned long type);
  // GET_INFO pieces.
  [[nodiscard]] uint64_t pgsize_bitmap() const;  // mu held
  [[nodiscard]] uint64_t min_pgsize() const { return pgsize_bitmap() & -pgsize_bitmap(); }
  Status map(uint64_t iova, uint64_t size, uint64_t vaddr, bool set_vaddr, uint32_t prot);
  // Bytes unmapped go to *unmapped on success only. With bitmap_pgsize, the
  // dirty bits of [iova, iova + size) at that page size go to bitmap_out:
  // each mapping's bits at (its iova - iova) / pgsize, read after its
  // translations are gone and before its log is cleared.
  Status unmap(uint64_t iova, uint64_t size, bool all, bool vaddr, uint64_t* unmapped,
               uint64_t bitmap_pgsize, std::span<uint64_t> bitmap_out);
  Status dirty_get(uint64_t iova, uint64_t size, uint64_t pgsize, std::span<uint64_t> out);

  Status add_group(iomm_vfio_group* g);
  // What a group removal hands back, to be released by the caller once no
  // lock is held: releasing the access waits for its running callback, and
  // releasing the last IOAS reference removes every mapping. Members are
  // destroyed access first.
  struct Released {
    std::shared_ptr<Ioas> ioas;  // the container's IOAS, when g was the last group
    std::shared_ptr<Access> access;
  };
  // Detach and forget g (nothing if the container no longer has it).
  Released remove_group(iomm_vfio_group* g) noexcept;
  // Detach every group (closing the container), then wait for the calls in
  // flight. Not from inside a callback of this container.
  void close() noexcept;

  // In-flight calls. enter() only while the caller knows the container is
  // open (its handle, or a group's link under link_mu).
  void enter() noexcept;
  void leave() noexcept;

  sync::RankedMutex mu{sync::LockRank::compat_container, "compat::Container::mu"};
  bool iommu_set = false;  // mu
  std::atomic<bool> v2{false};
  std::atomic<uint32_t> vaddr_invalid{0};
  uint32_t limit = kDefaultMaxMappings;  // mu
  int owner_pid = 0;                     // mu
  bool dirty_tracking = false;           // mu
  std::shared_ptr<Ioas> ioas;            // mu; set with the IOMMU
  std::map<uint64_t, Dma> dmas;          // mu; by iova
  std::vector<iomm_vfio_group*> groups;  // mu
  FdRegistry fds;                        // its own lock

  [[nodiscard]] bool has_mediated() const;  // mu
  [[nodiscard]] bool has_domain() const;    // mu

 private:
  Status attach_group(iomm_vfio_group* g);  // mu held, IOMMU set
  // mu held; returns the access to release outside mu.
  std::shared_ptr<Access> detach_group(iomm_vfio_group* g) noexcept;
  // Forget the IOMMU (mu held); returns the IOAS to release outside mu.
  std::shared_ptr<Ioas> take_iommu() noexcept;
  Dma& record(uint64_t iova);  // mu held; the record must exist
  // If [first, last] touches a mapping an unmap is removing, wait (mu
  // released) until an unmap finishes and return true: the caller starts
  // over. EDEADLOCK instead if that unmap is this thread's, or waits for it
  // through other waiting unmaps (callbacks reaching each other's victims).
  Result<bool> wait_for_unmap(std::unique_lock<sync::RankedMutex>& lk, uint64_t first,
                              uint64_t last);

  sync::CondVar unmap_done_;  // with mu: an unmap finished
  // A thread waiting in wait_for_unmap for another's unmap: a node on the
  // waiter's stack (so waiting allocates nothing), with the unmapping
  // thread it waits for.
  struct UnmapWaiter {
    std::thread::id self;
    std::thread::id holder;
    UnmapWaiter* next;
  };
  UnmapWaiter* waiters_ = nullptr;  // mu
  sync::RankedMutex calls_mu_{sync::LockRank::compat_calls, "Container::calls_mu_"};
  sync::CondVar calls_done_;
  uint64_t calls_ = 0;  // calls_mu_
};

}  // namespace iomm::compat

struct iomm_vfio_container {
  iomm::compat::Container c;
};
