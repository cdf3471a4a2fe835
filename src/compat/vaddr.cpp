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

#include "compat/container.hpp"

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

bool find_vma(uint64_t addr, Vma* out) {
  FILE* f = std::fopen("/proc/self/maps", "re");
  if (f == nullptr) return false;
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
  if (find_vma(vaddr, &vma) && vma.shared && vma.ino != 0 && vaddr + size <= vma.end) {
    const uint64_t offset = vma.offset + (vaddr - vma.start);
    *backing = Backing{true, vma.dev, vma.ino, offset};
    char path[64];
    std::snprintf(path, sizeof(path), "/proc/self/map_files/%" PRIx64 "-%" PRIx64, vma.start,
                  vma.end);
    const int fd = ::open(path, (vma.writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    if (fd >= 0) {
      struct stat st {};
      auto source = MemorySource::from_file(fd, offset, size);
      const bool same = ::fstat(fd, &st) == 0 && st.st_ino == vma.ino;
      ::close(fd);
      if (source.ok() && same) return source;
    }
  }
  return MemorySource::from_user(reinterpret_cast<void*>(vaddr), size, true);
}

}  // namespace iomm::compat
