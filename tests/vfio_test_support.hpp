// Helpers for tests of the type1 C interface (include/iomm/vfio_compat.h).
// Each call returns 0 on success or the errno the failed call set.
#pragma once

#include <gtest/gtest.h>
#include <linux/vfio.h>

#include <cerrno>
#include <cstdint>

#include "iomm/vfio_compat.h"

namespace iomm::test::vfio {

inline int call(iomm_vfio_container* c, unsigned long request, void* arg) {
  errno = 0;
  return iomm_vfio_ioctl(c, request, arg) == 0 ? 0 : errno;
}

inline int map(iomm_vfio_container* c, uint64_t iova, const void* vaddr, uint64_t size,
               uint32_t flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE) {
  vfio_iommu_type1_dma_map m{.argsz = sizeof(m),
                             .flags = flags,
                             .vaddr = reinterpret_cast<uint64_t>(vaddr),
                             .iova = iova,
                             .size = size};
  return call(c, VFIO_IOMMU_MAP_DMA, &m);
}

// unmapped, when given, receives the struct's size after the call (what the
// kernel writes back on success; untouched on failure).
inline int unmap(iomm_vfio_container* c, uint64_t iova, uint64_t size, uint32_t flags = 0,
                 uint64_t* unmapped = nullptr) {
  vfio_iommu_type1_dma_unmap u{.argsz = sizeof(u), .flags = flags, .iova = iova, .size = size};
  const int e = call(c, VFIO_IOMMU_UNMAP_DMA, &u);
  if (unmapped != nullptr) *unmapped = u.size;
  return e;
}

// One byte of device DMA through a software group.
inline int dma(iomm_vfio_group* g, uint64_t iova, char* byte, int write) {
  errno = 0;
  return iomm_vfio_group_dma_rw(g, iova, byte, 1, write) == 0 ? 0 : errno;
}

// A type1v2 container with one software group.
struct SoftwareContainer {
  iomm_vfio_container* c = iomm_vfio_open();
  iomm_vfio_group* sw = iomm_vfio_group_create_software(c, nullptr);
  SoftwareContainer() {
    EXPECT_EQ(iomm_vfio_ioctl(c, VFIO_SET_IOMMU, reinterpret_cast<void*>(VFIO_TYPE1v2_IOMMU)), 0);
  }
  ~SoftwareContainer() {
    iomm_vfio_group_destroy(sw);
    iomm_vfio_close(c);
  }
  SoftwareContainer(const SoftwareContainer&) = delete;
  SoftwareContainer& operator=(const SoftwareContainer&) = delete;
};

}  // namespace iomm::test::vfio
