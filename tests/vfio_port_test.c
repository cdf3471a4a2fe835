/* A VFIO type1 program written against <linux/vfio.h> and the iomm C header
 * only, compiled as C: the kernel version would call ioctl(fd, ...). */
#define _GNU_SOURCE
#include <errno.h>
#include <iomm/vfio_compat.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define CHECK(cond)                                                                              \
  do {                                                                                           \
    if (!(cond)) {                                                                               \
      fprintf(stderr, "%s:%d: check failed: %s (errno %d)\n", __FILE__, __LINE__, #cond, errno); \
      exit(1);                                                                                   \
    }                                                                                            \
  } while (0)

static iomm_vfio_container* container;
static iomm_vfio_group* mdev;
static uint64_t pinned_iova;
static int pinned;

/* The mdev driver's dma_unmap: unpin what it holds in the range. */
static void dma_unmap(void* opaque, uint64_t iova, uint64_t size) {
  (void)opaque;
  if (pinned && pinned_iova >= iova && pinned_iova < iova + size) {
    CHECK(iomm_vfio_unpin_pages(mdev, pinned_iova, 1) == 1);
    pinned = 0;
  }
}

int main(void) {
  const size_t size = 1 << 20;
  void* mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(mem != MAP_FAILED);

  container = iomm_vfio_open();
  CHECK(container != NULL);
  CHECK(iomm_vfio_ioctl(container, VFIO_GET_API_VERSION, NULL) == VFIO_API_VERSION);
  CHECK(iomm_vfio_ioctl(container, VFIO_CHECK_EXTENSION, (void*)VFIO_TYPE1v2_IOMMU) == 1);

  iomm_vfio_group* sw = iomm_vfio_group_create_software(container, NULL);
  CHECK(sw != NULL);
  mdev = iomm_vfio_group_create_mediated(container, dma_unmap, NULL);
  CHECK(mdev != NULL);
  CHECK(iomm_vfio_ioctl(container, VFIO_SET_IOMMU, (void*)VFIO_TYPE1v2_IOMMU) == 0);

  struct vfio_iommu_type1_info info = {.argsz = sizeof(info)};
  CHECK(iomm_vfio_ioctl(container, VFIO_IOMMU_GET_INFO, &info) == 0);
  CHECK(info.flags & VFIO_IOMMU_INFO_PGSIZES);
  CHECK(info.iova_pgsizes & 4096);

  struct vfio_iommu_type1_dma_map map = {
      .argsz = sizeof(map),
      .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
      .vaddr = (uintptr_t)mem,
      .iova = 0x100000,
      .size = size,
  };
  CHECK(iomm_vfio_ioctl(container, VFIO_IOMMU_MAP_DMA, &map) == 0);

  struct vfio_iommu_type1_dirty_bitmap start = {.argsz = sizeof(start),
                                                .flags = VFIO_IOMMU_DIRTY_PAGES_FLAG_START};
  CHECK(iomm_vfio_ioctl(container, VFIO_IOMMU_DIRTY_PAGES, &start) == 0);

  /* Device DMA through the software group. */
  const char msg[] = "hello from the device";
  CHECK(iomm_vfio_group_dma_rw(sw, 0x100000 + 0x2000, (void*)msg, sizeof(msg), 1) == 0);
  CHECK(memcmp((char*)mem + 0x2000, msg, sizeof(msg)) == 0);

  /* The mediated device pins a page and writes through vfio_dma_rw. */
  void* host = NULL;
  CHECK(iomm_vfio_pin_pages(mdev, 0x100000 + 0x5000, 1, IOMM_VFIO_PROT_WRITE, &host) == 1);
  CHECK(host == (char*)mem + 0x5000);
  pinned_iova = 0x100000 + 0x5000;
  pinned = 1;
  CHECK(iomm_vfio_dma_rw(mdev, 0x100000 + 0x9000, (void*)msg, sizeof(msg), 1) == 0);

  /* Dirty bitmap: pages 2 (DMA), 5 (pinned) and 9 (dma_rw). */
  uint64_t bits[4] = {0};
  uint64_t buf[(sizeof(struct vfio_iommu_type1_dirty_bitmap) +
                sizeof(struct vfio_iommu_type1_dirty_bitmap_get) + 7) /
               8] = {0};
  struct vfio_iommu_type1_dirty_bitmap* hdr = (void*)buf;
  struct vfio_iommu_type1_dirty_bitmap_get* get = (void*)hdr->data;
  hdr->argsz = sizeof(*hdr) + sizeof(*get);
  hdr->flags = VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP;
  get->iova = 0x100000;
  get->size = size;
  get->bitmap.pgsize = 4096;
  get->bitmap.size = sizeof(bits);
  get->bitmap.data = (__u64*)bits;
  CHECK(iomm_vfio_ioctl(container, VFIO_IOMMU_DIRTY_PAGES, hdr) == 0);
  CHECK(bits[0] == ((1ULL << 2) | (1ULL << 5) | (1ULL << 9)));
  CHECK(bits[1] == 0 && bits[2] == 0 && bits[3] == 0);

  /* Unmap everything: the callback unpins. */
  struct vfio_iommu_type1_dma_unmap unmap = {.argsz = sizeof(unmap),
                                             .flags = VFIO_DMA_UNMAP_FLAG_ALL};
  CHECK(iomm_vfio_ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap) == 0);
  CHECK(unmap.size == size);
  CHECK(pinned == 0);
  CHECK(iomm_vfio_group_dma_rw(sw, 0x100000, (void*)msg, 1, 0) == -1 && errno == EFAULT);

  iomm_vfio_group_destroy(mdev);
  iomm_vfio_group_destroy(sw);
  iomm_vfio_close(container);
  munmap(mem, size);
  puts("vfio_port_test: ok");
  return 0;
}
