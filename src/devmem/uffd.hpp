// userfaultfd for device memory: minor faults on shmem, answered with
// UFFDIO_CONTINUE, and UFFDIO_POISON where the running kernel has it.
//
// The build's kernel headers (6.1) predate UFFDIO_POISON (6.6); its ABI is
// defined here and used only when UFFDIO_API reports UFFD_FEATURE_POISON.
#pragma once

#include <linux/userfaultfd.h>
#include <sys/ioctl.h>

#include <cstdint>

#include "iomm/result.hpp"

#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
struct uffdio_poison {
  struct uffdio_range range;
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1 << 0)
  __u64 mode;
  __s64 updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif

namespace iomm::devmem {

inline constexpr uint64_t kPage = 4096;

// Features the kernel offers (probed once with a throwaway descriptor), or an
// error if userfaultfd cannot be opened at all (EPERM: neither
// vm.unprivileged_userfaultfd=1 nor CAP_SYS_PTRACE, and no user-mode-only
// support either).
Result<uint64_t> kernel_features() noexcept;

struct Uffd {
  int fd = -1;
  uint64_t features = 0;  // what this descriptor was opened with
};

// A userfaultfd for minor faults on shmem (UFFD_FEATURE_MINOR_SHMEM, plus
// UFFD_FEATURE_POISON when offered), non-blocking and close-on-exec. Falls
// back to UFFD_USER_MODE_ONLY when a full descriptor is refused (EPERM):
// consumers touch device memory from user mode; a kernel access (a read()
// into the mapping) then fails with EFAULT instead of waiting for the owner.
// ENOTSUP: the kernel has no minor faults on shmem.
Result<Uffd> open_minor_uffd() noexcept;

}  // namespace iomm::devmem
