/* A VFIO type1 user in C: <linux/vfio.h> requests through iomm's container.
 * A software group does device DMA; a mediated group pins a page and must
 * unpin it when the mapping goes away. Exits non-zero on any surprise. */
#define _GNU_SOURCE
#include <errno.h>
#include <iomm/version.h>
#include <iomm/vfio_compat.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define CHECK(cond)                                                                       \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      fprintf(stderr, "%s:%d: %s failed (errno %d)\n", __FILE__, __LINE__, #cond, errno); \
      exit(1);                                                                            \
    }                                                                                     \
  } while (0)

static iomm_vfio_group* mdev;
static uint64_t pinned_iova;
static int pinned;

/* The mediated driver's dma_unmap: drop the pin it holds in the range. */
static void dma_unmap(void* opaque, uint64_t iova, uint64_t size) {
  (void)opaque;
  if (pinned && pinned_iova >= iova && pinned_iova - iova < size) {
    CHECK(iomm_vfio_unpin_pages(mdev, pinned_iova, 1) == 1);
    pinned = 0;
  }
}

int main(void) {
  const size_t size = 1 << 20;
  const uint64_t iova = 0x100000;
  char* mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(mem != MAP_FAILED);

  iomm_vfio_container* container = iomm_vfio_open();
  CHECK(container != NULL);
  iomm_vfio_group* sw = iomm_vfio_group_create_software(container, NULL);
  CHECK(sw != NULL);
  mdev = iomm_vfio_group_create_mediated(container, dma_unmap, NULL);
  CHECK(mdev != NULL);
  CHECK(iomm_vfio_ioctl(container, VFIO_SET_IOMMU, (void*)VFIO_TYPE1v2_IOMMU) == 0);

  struct vfio_iommu_type1_dma_map map = {
      .argsz = sizeof(map),
      .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
      .vaddr = (uintptr_t)mem,
      .iova = iova,
      .size = size,
  };
  CHECK(iomm_vfio_ioctl(container, VFIO_IOMMU_MAP_DMA, &map) == 0);

  const char msg[] = "hello from the device";
  CHECK(iomm_vfio_group_dma_rw(sw, iova + 0x2000, (void*)msg, sizeof(msg), 1) == 0);
  CHECK(memcmp(mem + 0x2000, msg, sizeof(msg)) == 0);

  void* host = NULL;
  CHECK(iomm_vfio_pin_pages(mdev, iova + 0x2000, 1, IOMM_VFIO_PROT_READ, &host) == 1);
  CHECK(host == mem + 0x2000);
  pinned_iova = iova + 0x2000;
  pinned = 1;

  /* Unmapping calls dma_unmap, which unpins, before the mapping goes. */
  struct vfio_iommu_type1_dma_unmap unmap = {.argsz = sizeof(unmap), .iova = iova, .size = size};
  CHECK(iomm_vfio_ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap) == 0);
  CHECK(unmap.size == size);
  CHECK(!pinned);
  /* The IOVA is gone: device DMA to it is an IOMMU fault. */
  char byte;
  errno = 0;
  CHECK(iomm_vfio_group_dma_rw(sw, iova, &byte, 1, 0) == -1 && errno == EFAULT);

  CHECK(iomm_vfio_group_destroy(mdev) == 0);
  CHECK(iomm_vfio_group_destroy(sw) == 0);
  CHECK(iomm_vfio_close(container) == 0);
  printf("type1_c (iomm %s): DMA, pin, unmap with dma_unmap callback: ok\n", IOMM_VERSION_STRING);
  return 0;
}
