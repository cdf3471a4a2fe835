// What a MAP_DMA vaddr range is: the identity a VADDR update must reach
// again, and the source that is pinned for it.
//
// A range in a shared file mapping (memfd, tmpfs, hugetlb, shared anonymous
// memory) has identity (device, inode, offset), read from /proc/self/maps,
// which any process may read. Consecutive VMAs of one file at contiguous
// offsets (one mapping split by mprotect or madvise) count as one. Its pages
// are pinned through the library's own mapping of the file when it can open
// the file: from an fd registered with iomm_vfio_register_fd(), else through
// /proc/self/map_files (CAP_SYS_ADMIN). Without either the range is pinned
// by address but keeps its file identity; DMA then depends on the caller's
// mapping, as it does for anonymous memory, and invalidating its vaddr is
// refused (check_vaddr_invalidation).
#pragma once

#include <cstdint>

#include "compat/fd_registry.hpp"
#include "iomm/result.hpp"
#include "iomm/source.hpp"

namespace iomm::compat {

// Where a vaddr range lives: a shared file mapping (identity = file and
// offset) or anonymous memory (identity = the address).
struct Backing {
  bool file = false;
  uint64_t dev = 0;
  uint64_t ino = 0;
  uint64_t offset = 0;
  // The library maps the file itself: DMA does not depend on the caller's
  // addresses.
  bool own_mapping = false;
};

// The source for [vaddr, vaddr + size) and its backing. EFAULT when the
// mapping changes while it is resolved; errors of MemorySource::from_file.
Result<MemorySource> resolve_vaddr(const FdRegistry& fds, uint64_t vaddr, uint64_t size,
                                   Backing* backing);

// Whether a mapping with this backing may have its vaddr invalidated
// (UNMAP_DMA with VFIO_DMA_UNMAP_FLAG_VADDR): EPERM, saying what to do, for
// a file range pinned by address, whose DMA would stop with the caller's
// mapping although type1 promises it continues.
Status check_vaddr_invalidation(const Backing& backing);

}  // namespace iomm::compat
