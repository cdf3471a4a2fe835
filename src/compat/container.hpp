// The VFIO type1 container over an IOAS (see include/iomm/vfio_compat.h).
//
// Type1's rules live here and in the ioctl layer only: the core IOAS, domain
// and access know nothing of vfio_dma records, v1 unmap or dma_avail.
// Locking: Container::mu is type1's iommu->lock, held by every container
// operation except the mediated pin/unpin/rw paths, which read only atomics
// and go straight to the access (so a dma_unmap callback, called while an
// unmap holds mu, can unpin).
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "compat/fd_registry.hpp"
#include "compat/vaddr.hpp"
#include "iomm/access.hpp"
#include "iomm/domain.hpp"
#include "iomm/ioas.hpp"
#include "iomm/result.hpp"
#include "iomm/vfio_compat.h"

namespace iomm::compat {

// One MAP_DMA (type1's vfio_dma).
struct Dma {
  uint64_t iova;
  uint64_t size;
  uint64_t vaddr;
  uint32_t prot;
  bool vaddr_invalid = false;
  Backing backing;
};

class Container;

}  // namespace iomm::compat

struct iomm_vfio_group {
  iomm::compat::Container* container = nullptr;
  bool mediated = false;
  // software
  iomm::DomainConfig config;
  uint64_t pgsize_bitmap = 0;
  std::shared_ptr<iomm::SoftDomain> domain;
  std::atomic<bool> attached{false};
  // mediated
  iomm_vfio_dma_unmap_fn dma_unmap = nullptr;
  void* opaque = nullptr;
  std::shared_ptr<iomm::Access> access;  // set while the IOMMU is set
  std::atomic<iomm::Access*> access_ptr{nullptr};
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
  // Returns bytes unmapped (written back even on failure through *unmapped).
  Status unmap(uint64_t iova, uint64_t size, bool all, bool vaddr, uint64_t* unmapped,
               uint64_t bitmap_pgsize, std::span<uint64_t> bitmap_out);
  Status dirty_get(uint64_t iova, uint64_t size, uint64_t pgsize, std::span<uint64_t> out);

  Status add_group(iomm_vfio_group* g);
  void remove_group(iomm_vfio_group* g) noexcept;

  std::mutex mu;
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
  void detach_group(iomm_vfio_group* g) noexcept;
  void release_iommu() noexcept;
  // The dirty bits of [iova, iova + size) at pgsize granularity into out,
  // read and cleared, or (clear false) only read. mu held.
  Status collect_dirty(uint64_t iova, uint64_t size, uint64_t pgsize, std::span<uint64_t> out,
                       bool clear);
};

}  // namespace iomm::compat

struct iomm_vfio_container {
  iomm::compat::Container c;
};
