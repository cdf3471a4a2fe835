// Shared helpers for the iomm fuzz targets: an input reader that consumes
// bytes front to back (so hand-written seeds are easy to read), checks that
// abort() so libFuzzer records a crash, and process setup.
#pragma once

#include <linux/capability.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

#include "iomm/result.hpp"

namespace iomm::fuzz {

// Reads the input front to back; past the end every read yields 0, so any
// prefix of an input is itself a valid input.
class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  [[nodiscard]] bool empty() const noexcept { return pos_ >= size_; }
  [[nodiscard]] size_t remaining() const noexcept { return empty() ? 0 : size_ - pos_; }
  uint8_t u8() noexcept { return pos_ < size_ ? data_[pos_++] : 0; }
  uint16_t u16() noexcept { return static_cast<uint16_t>(u8() | (u8() << 8)); }
  uint32_t u32() noexcept { return u16() | (static_cast<uint32_t>(u16()) << 16); }
  uint64_t u64() noexcept { return u32() | (static_cast<uint64_t>(u32()) << 32); }
  // Copy up to n bytes into out, zero-filling past the end; returns bytes taken.
  size_t bytes(void* out, size_t n) noexcept {
    const size_t take = n < remaining() ? n : remaining();
    if (take > 0) std::memcpy(out, data_ + pos_, take);
    if (take < n) std::memset(static_cast<uint8_t*>(out) + take, 0, n - take);
    pos_ += take;
    return take;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

// IOMM_FUZZ_TRACE=1 prints a reproducer's trace: this line, then one "step"
// line per step. libFuzzer runs a lone input a second time when the first
// run's mallocs and frees do not balance (its leak check), and whether they
// balance depends on what other threads allocate meanwhile, so a replay holds
// one or two runs. The line opens each run so that fuzz/run.sh can compare
// every run with the expected trace.
inline void trace_input_start(bool tracing) {
  if (tracing) std::fputs("trace: input\n", stderr);
}

// Context printed with every failed check (the step being run).
inline thread_local const char* g_step_name = "setup";
inline thread_local int g_step_index = -1;

[[noreturn]] inline void fail(const char* file, int line, const char* fmt, ...) {
  std::fprintf(stderr, "\n==iomm-fuzz== INVARIANT VIOLATED at %s:%d (step %d, %s): ", file, line,
               g_step_index, g_step_name);
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::abort();
}

#define FUZZ_CHECK(cond, ...)                                         \
  do {                                                                \
    if (!(cond)) ::iomm::fuzz::fail(__FILE__, __LINE__, __VA_ARGS__); \
  } while (0)

// The errno of a failed call must be one its contract lists.
inline void check_errno(int code, std::initializer_list<int> allowed, const char* call,
                        const std::string& message, const char* file, int line) {
  for (int e : allowed) {
    if (e == code) return;
  }
  fail(file, line, "%s failed with %s (%d), which its contract does not list: %s", call,
       errno_name(code), code, message.c_str());
}

#define FUZZ_CHECK_ERRNO(result, call, ...)                                                     \
  do {                                                                                          \
    const auto& r_ = (result);                                                                  \
    if (!r_.ok())                                                                               \
      ::iomm::fuzz::check_errno(r_.code(), {__VA_ARGS__}, call, r_.error().message(), __FILE__, \
                                __LINE__);                                                      \
  } while (0)

// Drop CAP_IPC_LOCK from this thread's effective set, so mappings are charged
// against the configured memlock limit (and the kernel's RLIMIT_MEMLOCK
// applies to the real mlock). Returns whether it is now clear.
inline bool drop_ipc_lock() {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};
  if (syscall(SYS_capget, &header, data) != 0) return false;
  data[CAP_TO_INDEX(CAP_IPC_LOCK)].effective &= ~CAP_TO_MASK(CAP_IPC_LOCK);
  if (syscall(SYS_capset, &header, data) != 0) return false;
  return true;
}

}  // namespace iomm::fuzz
