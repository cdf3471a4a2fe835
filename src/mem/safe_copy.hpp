// Copies that survive memory vanishing under them.
//
// A MAP_SHARED mapping of an unsealed memfd raises SIGBUS when the file is
// truncated under it. DMA copy paths go through safe_copy, which turns a
// SIGBUS raised inside the copy into a false return (EFAULT for the caller)
// instead of a crash. A SIGBUS outside a safe copy goes to the handler that
// was installed before ours (or the default action).
#pragma once

#include <cstddef>

namespace iomm::mem {

// Copy n bytes. False if the copy hit SIGBUS; the destination may then be
// partially written.
bool safe_copy(void* dst, const void* src, size_t n) noexcept;

}  // namespace iomm::mem
