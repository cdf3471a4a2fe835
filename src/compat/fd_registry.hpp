// The files a type1 container may map through its own mapping.
//
// A caller that holds the fd of a file it maps shared (vhost-user and
// vfio-user servers receive them over their socket) registers it with
// iomm_vfio_register_fd(). MAP_DMA of a vaddr in a shared mapping of that
// file then pins the file through the library's mapping, opened from the
// registered fd, so the caller's addresses can come and go (VADDR updates)
// while DMA keeps working; no privilege is needed, unlike reopening the
// file through /proc/self/map_files.
//
// Keyed by (device, inode): registering a second fd of one file replaces the
// first. The registry holds its own duplicates, closed on unregister or when
// the container goes. Mappings made already keep the library's mapping
// whatever happens here. Locking: mu_ is a leaf below Container::mu (the
// file layer's locks nest inside it).
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <utility>

#include "iomm/result.hpp"
#include "iomm/source.hpp"
#include "sync/ranked_mutex.hpp"

namespace iomm::compat {

class FdRegistry {
 public:
  FdRegistry() = default;
  ~FdRegistry();
  FdRegistry(const FdRegistry&) = delete;
  FdRegistry& operator=(const FdRegistry&) = delete;

  // EBADF fd not open; EINVAL not a regular file, or open write-only;
  // EMFILE, ENOMEM.
  Status add(int fd);
  // ENOENT: no fd of that file is registered. EBADF fd not open.
  Status remove(int fd);
  // The source for [offset, offset + size) of the file, made from its
  // registered fd; nullopt when the file has none.
  [[nodiscard]] std::optional<Result<MemorySource>> source(uint64_t dev, uint64_t ino,
                                                           uint64_t offset, uint64_t size) const;

 private:
  mutable sync::RankedMutex mu_{sync::LockRank::compat_fd_registry, "FdRegistry::mu_"};
  std::map<std::pair<uint64_t, uint64_t>, int> fds_;  // (dev, ino) -> our duplicate
};

}  // namespace iomm::compat
