/*
 * The VFIO type1 container uapi over iomm (C ABI).
 *
 * Contract
 * - iomm_vfio_ioctl() takes the request numbers and structs of
 *   <linux/vfio.h> and returns what ioctl(2) on a type1 container would: 0 or
 *   a value, or -1 with errno set. Code written for /dev/vfio/vfio ports by
 *   replacing ioctl(container_fd, ...) with iomm_vfio_ioctl(container, ...).
 * - Groups stand in for the kernel's VFIO groups: a container needs one
 *   before VFIO_SET_IOMMU. A software group is a software IOMMU domain (its
 *   device DMA goes through iomm_vfio_group_dma_rw); a mediated group is an
 *   emulated-IOMMU device with type1's vfio_pin_pages / vfio_unpin_pages /
 *   vfio_dma_rw. Destroying the last group releases the container's IOMMU
 *   (every mapping is removed), as in the kernel.
 * - MAP_DMA vaddrs are this process's memory. A vaddr range inside a shared
 *   file mapping (memfd, tmpfs, hugetlb; consecutive VMAs of one file at
 *   contiguous offsets count as one) has the file's identity (device, inode,
 *   offset, read from /proc/self/maps), which a later VADDR update must reach
 *   again. Its pages are pinned through the library's own mapping of the
 *   file, so DMA keeps working after the caller unmaps its addresses, when
 *   the library can open the file: from an fd registered with
 *   iomm_vfio_register_fd() (no privilege needed), else by reopening it
 *   through /proc/self/map_files (needs CAP_SYS_ADMIN). Without either, the
 *   range is pinned by address, like other memory, which must stay mapped
 *   while it is mapped for DMA; UNMAP_DMA with VFIO_DMA_UNMAP_FLAG_VADDR of
 *   such a file range fails with EPERM (register the fd first).
 * - Charging is per process (type1's locked_vm): by default this process;
 *   iomm_vfio_set_owner_pid() emulates another process issuing the calls.
 * - Thread-safe: any entry point may race any other, except that a handle
 *   must not be used after (or concurrently with the start of) its own
 *   close/destroy. Closing a container waits for the calls already in
 *   flight on it, including group calls that reached it.
 * - The dma_unmap callback runs on the unmapping thread, once per mapping
 *   being removed (iova and size of that mapping), with no iomm lock held.
 *   It must unpin every page it holds in the range (iomm_vfio_unpin_pages)
 *   and may call any other entry point, e.g. GET_INFO or MAP_DMA of another
 *   range. While it runs the mapping still exists, as in type1: a MAP over
 *   it fails with EEXIST and DMA_AVAIL counts it; an UNMAP, a VADDR update
 *   or a GET_BITMAP touching it waits for that unmap to finish and then
 *   starts over (EDEADLOCK instead from the callback itself, or when unmaps
 *   would wait for each other in a cycle); new pins and dma_rw of it fail
 *   with EINVAL. Destroying a group waits for its running callback and no
 *   callback starts after it returns: do not destroy a group from its own
 *   callback, nor while holding a lock that callback takes; do not close the
 *   container from any of its callbacks.
 * - Struct copy-out follows the kernel: a failed ioctl writes nothing back
 *   (an UNMAP_DMA error leaves `size` as passed). GET_INFO follows Linux
 *   6.6+: min(argsz, sizeof(struct vfio_iommu_type1_info)) bytes of a
 *   zero-filled struct go back, capabilities are 8-byte aligned.
 */
#ifndef IOMM_VFIO_COMPAT_H
#define IOMM_VFIO_COMPAT_H

#include <stddef.h>
#include <stdint.h>

#include "iomm/export.hpp"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct iomm_vfio_container iomm_vfio_container;
typedef struct iomm_vfio_group iomm_vfio_group;

/* A container, or NULL with errno (ENOMEM). */
IOMM_API iomm_vfio_container* iomm_vfio_open(void);
/* ioctl(2) on the container: 0 or a value, or -1 with errno. */
IOMM_API long iomm_vfio_ioctl(iomm_vfio_container* c, unsigned long request, void* arg);
/* Detaches the container's groups (as closing /dev/vfio/vfio does), waits
 * for the calls in flight on it, and frees the container. Not from inside
 * one of its dma_unmap callbacks. Each group must still be destroyed with
 * iomm_vfio_group_destroy(); its calls fail with EINVAL meanwhile.
 * Returns 0. */
IOMM_API int iomm_vfio_close(iomm_vfio_container* c);

/* Type1's dma_entry_limit (default 65535); only before VFIO_SET_IOMMU
 * (EBUSY after). */
IOMM_API int iomm_vfio_set_dma_entry_limit(iomm_vfio_container* c, uint32_t limit);
/* The process the following MAP_DMA calls act for (0 = this process). */
IOMM_API int iomm_vfio_set_owner_pid(iomm_vfio_container* c, int pid);

struct iomm_vfio_reserved_range {
  uint64_t start;
  uint64_t last; /* inclusive */
};

struct iomm_vfio_sw_group_config {
  uint64_t aperture_start;
  uint64_t aperture_last; /* inclusive; 0 with start 0 = 48-bit default */
  uint64_t pgsize_bitmap; /* 0 = 4 KiB | 2 MiB | 1 GiB */
  const struct iomm_vfio_reserved_range* reserved;
  uint32_t nr_reserved;
};

/* Register fd (a regular file open for reading, or reading and writing) so
 * that MAP_DMA of vaddrs in shared mappings of its file pins the file
 * through the library's own mapping, made from a duplicate of fd: DMA then
 * survives the caller unmapping those vaddrs, and no privilege is needed.
 * The source is writable only if fd is open O_RDWR, the file has no write
 * seal and the caller's mapping is writable. Registering another fd of the
 * same file replaces the first; it affects MAP_DMA calls made afterwards.
 * Returns 0, or -1 with errno: EBADF container NULL or fd not open; EINVAL
 * not a regular file, or write-only; EMFILE, ENOMEM. */
IOMM_API int iomm_vfio_register_fd(iomm_vfio_container* c, int fd);
/* Forget the registered fd of fd's file (mappings made keep working).
 * Returns 0, or -1 with errno: EBADF; ENOENT none registered. */
IOMM_API int iomm_vfio_unregister_fd(iomm_vfio_container* c, int fd);

/* Create a group and add it to the container (VFIO_GROUP_SET_CONTAINER).
 * If the IOMMU is set, the software domain is attached at once: the
 * container's mappings are replayed and pinned, all or nothing.
 * Errors: EINVAL bad config, or a mapping outside the aperture / in a
 * reserved region / misaligned for the page size; EBUSY a vaddr is invalid;
 * ENOMEM, EFAULT from pinning. */
IOMM_API iomm_vfio_group* iomm_vfio_group_create_software(
    iomm_vfio_container* c, const struct iomm_vfio_sw_group_config* cfg);

/* dma_unmap(opaque, iova, size): mandatory (EINVAL without it). */
typedef void (*iomm_vfio_dma_unmap_fn)(void* opaque, uint64_t iova, uint64_t size);
IOMM_API iomm_vfio_group* iomm_vfio_group_create_mediated(iomm_vfio_container* c,
                                                          iomm_vfio_dma_unmap_fn dma_unmap,
                                                          void* opaque);
/* Remove the group from its container and free it. A mediated group's pins
 * are released; a running dma_unmap callback of the group is waited for and
 * none starts after this returns (so not from that callback, nor holding a
 * lock it takes). Destroying the last group releases the IOMMU. Returns 0. */
IOMM_API int iomm_vfio_group_destroy(iomm_vfio_group* g);

/* Prot for pin and rw: IOMMU_READ / IOMMU_WRITE as in the kernel. */
#define IOMM_VFIO_PROT_READ 1
#define IOMM_VFIO_PROT_WRITE 2

/* vfio_pin_pages: npage pages from iova (page aligned); host[i] gets each
 * page's host address. Returns npage, or -1 with errno: E2BIG npage > 512;
 * EINVAL npage 0, no host array, no IOMMU set, a page not mapped; EACCES
 * container not TYPE1v2; EBUSY a vaddr is invalid; EPERM prot mismatch;
 * ENOMEM memlock limit; EFAULT bad memory. All or nothing. */
IOMM_API int iomm_vfio_pin_pages(iomm_vfio_group* g, uint64_t iova, int npage, int prot,
                                 void** host);
/* vfio_unpin_pages: returns npage, or -1 with errno (EINVAL a page not
 * pinned; nothing is unpinned then). */
IOMM_API int iomm_vfio_unpin_pages(iomm_vfio_group* g, uint64_t iova, int npage);
/* vfio_dma_rw on a mediated group: EINVAL not mapped, EPERM prot, EBUSY
 * vaddr invalid, EFAULT copy failure. Returns 0. */
IOMM_API int iomm_vfio_dma_rw(iomm_vfio_group* g, uint64_t iova, void* data, size_t len, int write);
/* Device DMA through a software group's domain: EFAULT IOMMU fault
 * (unmapped), EPERM permission, EINVAL not attached. Returns 0. */
IOMM_API int iomm_vfio_group_dma_rw(iomm_vfio_group* g, uint64_t iova, void* data, size_t len,
                                    int write);

#ifdef __cplusplus
}
#endif

#endif /* IOMM_VFIO_COMPAT_H */
