// Whether a consumer's address range is a shared mapping of a region's view,
// read from /proc/<pid>/maps (any process of the same user may read it).
#pragma once

#include <sys/types.h>

#include <cstdint>

#include "iomm/result.hpp"

namespace iomm::devmem {

// OK if [address, address + length) of process pid is covered by MAP_SHARED
// mappings of the file (dev, ino) at file offset `offset` onwards.
// EINVAL: a private (copy-on-write) mapping, another file, or other
// offsets; EFAULT: part of the range is not mapped; ESRCH: no such process.
Status check_shared_mapping(pid_t pid, uint64_t address, uint64_t length, dev_t dev, ino_t ino,
                            uint64_t offset);

}  // namespace iomm::devmem
