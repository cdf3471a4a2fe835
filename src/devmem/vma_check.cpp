#include "devmem/vma_check.hpp"

#include <sys/sysmacros.h>

#include <cinttypes>
#include <cstdio>
#include <string>

namespace iomm::devmem {

Status check_shared_mapping(pid_t pid, uint64_t address, uint64_t length, dev_t dev, ino_t ino,
                            uint64_t offset) {
  const std::string path = "/proc/" + std::to_string(pid) + "/maps";
  FILE* maps = std::fopen(path.c_str(), "re");
  if (maps == nullptr) return Error(ESRCH, "cannot read " + path);
  const uint64_t end = address + length;
  uint64_t cursor = address;
  Status verdict = Error(EFAULT, "the consumer's range is not mapped");
  char line[512];
  while (cursor < end && std::fgets(line, sizeof line, maps) != nullptr) {
    uint64_t start = 0;
    uint64_t stop = 0;
    uint64_t file_offset = 0;
    unsigned major_no = 0;
    unsigned minor_no = 0;
    uint64_t inode = 0;
    char perms[5] = {};
    if (std::sscanf(line, "%" SCNx64 "-%" SCNx64 " %4s %" SCNx64 " %x:%x %" SCNu64, &start, &stop,
                    perms, &file_offset, &major_no, &minor_no, &inode) != 7) {
      continue;
    }
    if (stop <= cursor) continue;
    if (start > cursor) break;  // a hole
    if (perms[3] != 's') {
      verdict = Error(EINVAL,
                      "private (copy-on-write) mapping of device memory refused: a consumer "
                      "must map it MAP_SHARED");
      break;
    }
    if (makedev(major_no, minor_no) != dev || inode != ino ||
        file_offset + (cursor - start) != offset + (cursor - address)) {
      verdict = Error(EINVAL, "the consumer's range maps another file or other offsets");
      break;
    }
    cursor = stop;
  }
  std::fclose(maps);
  if (cursor >= end) return {};
  return verdict;
}

}  // namespace iomm::devmem
