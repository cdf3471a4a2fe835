// The kernel's VFIO type1 IOMMU as an IOAS domain: a container
// (/dev/vfio/vfio) with one group (/dev/vfio/N) set to TYPE1v2.
//
// Contract
// - Ownership: a KernelVfioDomain owns the container fd and the group fd it
//   opened. Destroying it closes them; the kernel then removes every mapping
//   left in the container and unpins its pages. Attach it to an IOAS with
//   Ioas::attach_external; the IOAS holds a reference while attached.
// - Mapping: as a domain of an IOAS, each of the IOAS's mappings becomes one
//   VFIO_IOMMU_MAP_DMA of the mapping's host address (the caller's memory
//   for MemorySource::from_user, the library's mapping of the file for
//   from_file; simulated memory has no host address and cannot be mapped:
//   EINVAL), and each unmap one VFIO_IOMMU_UNMAP_DMA of exactly that range.
//   The kernel pins the pages and charges the calling process's locked_vm;
//   the IOAS does not pin or charge them again (iomm/external_domain.hpp).
// - Geometry: the IOVA ranges (VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE) and the
//   page sizes (iova_pgsizes) come from the kernel's GET_INFO at attach.
// - Errors: every kernel error surfaces with the kernel's errno unchanged
//   (the message names the call). open(): ENOENT when /dev/vfio/vfio or
//   /dev/vfio/N does not exist (no VFIO on this machine, or no such group),
//   EACCES/EPERM from opening them, EINVAL group not viable (a device of it
//   is bound to a host driver), and SET_CONTAINER / SET_IOMMU's errors
//   (EPERM without interrupt remapping unless the kernel's
//   allow_unsafe_interrupts is set, EBUSY group already in a container).
// - Locking: every call is thread-safe; the kernel serializes the container.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "iomm/export.hpp"
#include "iomm/external_domain.hpp"
#include "iomm/range.hpp"
#include "iomm/result.hpp"

namespace iomm {

// The kernel's view of a container (VFIO_IOMMU_GET_INFO).
struct KernelIommuInfo {
  uint64_t page_sizes = 0;             // iova_pgsizes
  std::vector<IovaRange> iova_ranges;  // CAP_IOVA_RANGE (inclusive ends)
  bool has_dma_avail = false;
  uint32_t dma_avail = 0;  // CAP_DMA_AVAIL: mappings the container may still make
};

struct KernelVfioCounters {
  uint64_t mappings = 0;      // MAP_DMA calls that succeeded and are not unmapped
  uint64_t mapped_bytes = 0;  // their bytes
};

class IOMM_API KernelVfioDomain final : public ExternalDomain {
 public:
  // Open /dev/vfio/vfio and /dev/vfio/<group>, put the group in the
  // container and set TYPE1v2. `dev_dir` is /dev/vfio unless given.
  static Result<std::shared_ptr<KernelVfioDomain>> open(int group,
                                                        const std::string& dev_dir = "/dev/vfio");
  ~KernelVfioDomain() override;

  [[nodiscard]] int container_fd() const noexcept { return container_; }
  [[nodiscard]] int group_fd() const noexcept { return group_; }
  [[nodiscard]] int group() const noexcept { return group_number_; }

  // VFIO_IOMMU_GET_INFO with its capability chain.
  [[nodiscard]] Result<KernelIommuInfo> info() const;
  // VFIO_GROUP_GET_DEVICE_FD for a device of the group ("0000:00:03.0"); the
  // caller owns the fd.
  [[nodiscard]] Result<int> device_fd(const std::string& name) const;
  [[nodiscard]] KernelVfioCounters counters() const noexcept;

  Result<ExternalGeometry> geometry() override;
  Status map(uint64_t iova, void* host, uint64_t length, uint32_t prot) override;
  void unmap(uint64_t iova, uint64_t length) noexcept override;

 private:
  KernelVfioDomain(int container, int group, int group_number) noexcept;
  const int container_;
  const int group_;
  const int group_number_;
  std::atomic<uint64_t> mappings_{0};
  std::atomic<uint64_t> mapped_bytes_{0};
};

}  // namespace iomm
