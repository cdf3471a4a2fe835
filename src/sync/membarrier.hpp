// Asymmetric fences: a fast side that pays only a compiler barrier and a
// slow side that forces a full memory barrier on every running thread of
// the process (membarrier(2), MEMBARRIER_CMD_PRIVATE_EXPEDITED), as liburcu
// does for its readers. For Dekker-style handshakes where one side runs per
// access (a data path) and the other rarely (an invalidation).
#pragma once

#include <atomic>

namespace iomm::sync {

// Registers the process for expedited private membarriers once; whether
// they are available (Linux 4.14). Without them both sides must use
// std::atomic_thread_fence(seq_cst).
bool membarrier_available() noexcept;

// The fast side: a compiler barrier when `asymmetric`, else a full fence.
inline void light_fence(bool asymmetric) noexcept {
  if (asymmetric) {
    std::atomic_signal_fence(std::memory_order_seq_cst);
  } else {
    std::atomic_thread_fence(std::memory_order_seq_cst);
  }
}

// The slow side: a full barrier on every thread of the process when
// `asymmetric` (membarrier_available() returned true), else a full fence.
void heavy_fence(bool asymmetric) noexcept;

}  // namespace iomm::sync
