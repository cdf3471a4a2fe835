#include "compat/vaddr.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <string>

#include "core/errno_text.hpp"
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
  uint64_t first_end = 0;  // end of the first VMA: its /proc/self/map_files name
};

bool parse_vma(const char* line, Vma* out) {
  unsigned maj = 0;
  unsigned min = 0;
  char perms[8] = {};
  if (std::sscanf(line, "%" SCNx64 "-%" SCNx64 " %7s %" SCNx64 " %x:%x %" SCNu64, &out->start,
                  &out->end, perms, &out->offset, &maj, &min, &out->ino) != 7) {
    return false;
  }
  out->writable = perms[1] == 'w';
  out->shared = perms[3] == 's';
  out->dev = makedev(maj, min);
  return true;
}

// The shared file mapping that holds [vaddr, last] into *out: the VMA
// holding vaddr, joined with the VMAs that continue it in address and file
// offset (writable only if all are). False when the range is not wholly in
// one; an error when /proc/self/maps cannot be read (then we cannot tell a
// file mapping from anonymous memory).
Result<bool> find_file_range(uint64_t vaddr, uint64_t last, Vma* out) {
  FILE* f = IOMM_INJECT("vfio.read_maps") ? nullptr : std::fopen("/proc/self/maps", "re");
  if (f == nullptr) return Error(errno != 0 ? errno : EIO, "cannot read /proc/self/maps");
  char line[4096];
  bool started = false;
  bool covered = false;
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    Vma v;
    if (!parse_vma(line, &v)) continue;
    if (!started) {
      if (vaddr < v.start || vaddr >= v.end) continue;
      if (!v.shared || v.ino == 0) break;
      *out = v;
      out->first_end = v.end;
      started = true;
    } else {
      const bool continues = v.start == out->end && v.shared && v.dev == out->dev &&
                             v.ino == out->ino && v.offset == out->offset + (out->end - out->start);
      if (!continues) break;
      out->end = v.end;
      out->writable = out->writable && v.writable;
    }
    if (last < out->end) {
      covered = true;
      break;
    }
  }
  std::fclose(f);
  return covered;
}

}  // namespace

Result<MemorySource> resolve_vaddr(const FdRegistry& fds, uint64_t vaddr, uint64_t size,
                                   Backing* backing) {
  *backing = Backing{};
  Vma vma;
  auto found = find_file_range(vaddr, vaddr + size - 1, &vma);
  if (!found.ok()) return found.error();
  if (!*found) return MemorySource::from_user(reinterpret_cast<void*>(vaddr), size, true);
  const uint64_t offset = vma.offset + (vaddr - vma.start);
  const Backing file{true, vma.dev, vma.ino, offset, true};

  if (auto registered = fds.source(vma.dev, vma.ino, offset, size)) {
    if (!registered->ok()) return registered->error();
    *backing = file;
    // The registered fd may allow more than the caller's mapping does.
    return vma.writable ? **registered : (*registered)->read_only();
  }

  char path[64];
  std::snprintf(path, sizeof(path), "/proc/self/map_files/%" PRIx64 "-%" PRIx64, vma.start,
                vma.first_end);
  int fd = -1;
  if (IOMM_INJECT("vfio.open_map_file")) {
    errno = ENOENT;
  } else {
    fd = ::open(path, (vma.writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  }
  if (fd < 0 && (errno == EPERM || errno == EACCES)) {
    // No privilege to reopen the file (CAP_SYS_ADMIN in the initial user
    // namespace): pin the caller's addresses, keeping the file's identity
    // for the VADDR check.
    auto source = MemorySource::from_user(reinterpret_cast<void*>(vaddr), size, vma.writable);
    if (!source.ok()) return source.error();
    *backing = file;
    backing->own_mapping = false;
    return source;
  }
  if (fd < 0) {
    return Error(EFAULT, std::string("cannot open the file behind vaddr (") + path +
                             "): " + errno_text(errno));
  }
  struct stat st {};
  const bool same = ::fstat(fd, &st) == 0 && st.st_ino == vma.ino;
  // Type1 pins whatever file the kernel can pin, sealed or not: the layer
  // opts in to files that may shrink (its copies are guarded).
  auto source = MemorySource::from_file(fd, offset, size, FileSeal::allow_shrink);
  ::close(fd);
  if (!source.ok()) return source.error();
  if (!same) return Error(EFAULT, "the mapping at vaddr changed while it was resolved");
  *backing = file;
  return source;
}

Status check_vaddr_invalidation(const Backing& backing) {
  if (!backing.file || backing.own_mapping) return {};
  return Error(EPERM,
               "the vaddr is in a shared file mapping that the library could not map itself "
               "(reopening it through /proc/self/map_files needs CAP_SYS_ADMIN), so DMA would "
               "stop once the caller unmaps it: register the file's fd with "
               "iomm_vfio_register_fd() before VFIO_IOMMU_MAP_DMA");
}

}  // namespace iomm::compat
