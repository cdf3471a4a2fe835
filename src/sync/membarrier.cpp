#include "sync/membarrier.hpp"

#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>

namespace iomm::sync {

namespace {

long membarrier(int cmd) noexcept { return syscall(SYS_membarrier, cmd, 0U, 0); }

}  // namespace

bool membarrier_available() noexcept {
  static const bool available = [] {
    const long cmds = membarrier(MEMBARRIER_CMD_QUERY);
    return cmds >= 0 && (cmds & MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0 &&
           membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0;
  }();
  return available;
}

void heavy_fence(bool asymmetric) noexcept {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (!asymmetric) return;
  // Cannot fail once registered: a failure would leave a data path reading
  // through pointers that are being invalidated.
  if (membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0) std::abort();
}

}  // namespace iomm::sync
