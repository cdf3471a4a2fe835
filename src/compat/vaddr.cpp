// Resolve a MAP_DMA vaddr range to the memory object behind it.
//
// A range inside one shared file mapping (memfd, tmpfs, shared anonymous
// memory) is pinned as the file's pages: its identity is (device, inode,
// offset), which is what a VADDR update must reach again, and the library's
// own mapping of the file keeps DMA working whatever the caller does with
// its addresses. Anything else is pinned by address (MemorySource::from_user).
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <string>

#include "compat/container.hpp"
#include "fault/inject.hpp"

namespace iomm::compat {

namespace {

struct Vma {
  uint64_t start = 0;
  uint64_t end = 0;
  bool writable = false;
  bool shared = false;
  uint64_t offset = 0;
  uint64_t dev = 0;
  uint64_t ino = 0;
};

// Whether a VMA contains addr; an error when /proc/self/maps cannot be read
// (then we cannot tell a file mapping from anonymous memory).
Result<bool> find_vma(uint64_t addr, Vma* out) {
  FILE* f = IOMM_INJECT("vfio.read_maps") ? nullptr : std::fopen("/proc/self/maps", "re");
  if (f == nullptr) return Error(errno != 0 ? errno : EIO, "cannot read /proc/self/maps");
  char line[4096];
  bool found = false;
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    uint64_t start = 0;
    uint64_t end = 0;
    uint64_t offset = 0;
    unsigned maj = 0;
    unsigned min = 0;
    uint64_t ino = 0;
    char perms[8] = {};
    if (std::sscanf(line, "%" SCNx64 "-%" SCNx64 " %7s %" SCNx64 " %x:%x %" SCNu64, &start, &end,
                    perms, &offset, &maj, &min, &ino) != 7) {
      continue;
    }
    if (addr < start || addr >= end) continue;
    *out = Vma{start, end, perms[1] == 'w', perms[3] == 's', offset, makedev(maj, min), ino};
    found = true;
    break;
  }
  std::fclose(f);
  return found;
}

}  // namespace

Result<MemorySource> resolve_vaddr(uint64_t vaddr, uint64_t size, Backing* backing) {
  *backing = Backing{};
  Vma vma;
  auto found = find_vma(vaddr, &vma);
  if (!found.ok()) return found.error();
  if (!*found || !vma.shared || vma.ino == 0 || vaddr + size > vma.end) {
    return MemorySource::from_user(reinterpret_cast<void*>(vaddr), size, true);
  }
  // A shared file mapping is pinned as the file, or not at all: falling back
  // to its addresses would let a later VADDR update pass the same-object
  // check while domains point at addresses the caller may unmap.
  const uint64_t offset = vma.offset + (vaddr - vma.start);
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/self/map_files/%" PRIx64 "-%" PRIx64, vma.start,
                vma.end);
  const int fd = IOMM_INJECT("vfio.open_map_file")
                     ? -1
                     : ::open(path, (vma.writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) {
    return Error(EFAULT, std::string("cannot open the file behind vaddr (") + path + ")");
  }
  struct stat st {};
  const bool same = ::fstat(fd, &st) == 0 && st.st_ino == vma.ino;
  auto source = MemorySource::from_file(fd, offset, size);
  ::close(fd);
  if (!source.ok()) return source.error();
  if (!same) return Error(EFAULT, "the mapping at vaddr changed while it was resolved");
  *backing = Backing{true, vma.dev, vma.ino, offset};
  return source;
}

}  // namespace iomm::compat
