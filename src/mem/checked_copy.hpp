// Copies to and from this process's own virtual memory at addresses that may
// no longer be mapped, or no longer allow the access.
//
// process_vm_readv/writev on our own pid report such an address as EFAULT
// with no signal. Catching SIGSEGV instead could not work reliably next to
// sanitizers and fuzzers that own that signal and its alternate stack.
// A copy costs one system call; file-backed memory avoids it (safe_copy).
#pragma once

#include <cstddef>
#include <cstdint>

namespace iomm::mem {

// Copy n bytes from `address` into buf. False if part of the range is not
// readable; buf may then be partly written.
bool checked_read(void* buf, uint64_t address, size_t n) noexcept;
// Copy n bytes from buf to `address`. False if part of the range is not
// mapped writable; the range may then be partly written.
bool checked_write(uint64_t address, const void* buf, size_t n) noexcept;

}  // namespace iomm::mem
