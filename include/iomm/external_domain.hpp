// A domain whose I/O page table lives outside iomm (the kernel's VFIO type1
// container, see iomm/kernel_vfio.hpp), attached to an IOAS next to, or
// instead of, software domains.
//
// Contract
// - Ownership: the IOAS holds a shared_ptr while the domain is attached
//   (Ioas::attach_external .. Ioas::detach_external, or the IOAS's end).
//   A domain is attached to at most one IOAS at a time.
// - Pinning: the domain pins and charges what it maps itself (the kernel
//   pins at MAP_DMA and charges its locked_vm). The IOAS therefore does not
//   pin for it: an IOAS whose only domains are external pins nothing, and
//   memory mapped into both a software and an external domain is pinned by
//   each (iomm's pin store for the software one, the kernel for the other).
// - Calls: geometry() once at attach; map() for every mapping the IOAS has
//   or creates while attached (all-or-nothing: a failed map leaves nothing
//   in this domain); unmap() of exactly a range map() succeeded for, when
//   the mapping goes or the domain is detached. The IOAS calls them under
//   its domain lock (shared for map/unmap of disjoint ranges, which may run
//   concurrently), never under its tree lock, and never while an access
//   callback runs.
// - Errors: map() returns the backend's error unchanged (for the kernel:
//   its errno), and the IOAS returns it to its caller. unmap() cannot fail:
//   a backend that cannot remove a mapping it made aborts loudly.
#pragma once

#include <cstdint>
#include <vector>

#include "iomm/export.hpp"
#include "iomm/range.hpp"
#include "iomm/result.hpp"

namespace iomm {

struct ExternalGeometry {
  // IOVA ranges the domain can map (sorted, disjoint); the IOAS reserves
  // their complement while the domain is attached.
  std::vector<IovaRange> usable;
  // Smallest mapping granule (a power of two); raises the IOAS's alignment.
  uint64_t min_page_size = 4096;
};

class IOMM_API ExternalDomain {
 public:
  virtual ~ExternalDomain() = default;
  ExternalDomain() = default;
  ExternalDomain(const ExternalDomain&) = delete;
  ExternalDomain& operator=(const ExternalDomain&) = delete;

  virtual Result<ExternalGeometry> geometry() = 0;
  // Map [iova, iova + length) onto this process's memory at host with prot
  // (kProtRead | kProtWrite).
  virtual Status map(uint64_t iova, void* host, uint64_t length, uint32_t prot) = 0;
  virtual void unmap(uint64_t iova, uint64_t length) noexcept = 0;
};

}  // namespace iomm
