// Touching device memory that may be revoked under the test: a read or write
// that gets SIGBUS returns false instead of killing the test.
#pragma once

#include <setjmp.h>
#include <signal.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>

#include "iomm/signals.hpp"

namespace iomm::test {

class SigbusProbe {
 public:
  // Installs the probe's handler once, after the library's (so each passes
  // on what is not its own).
  static void install() {
    static std::once_flag once;
    std::call_once(once, [] {
      iomm::install_signal_handlers();
      struct sigaction sa {};
      sa.sa_sigaction = &handler;
      sa.sa_flags = SA_SIGINFO | SA_NODEFER;
      sigemptyset(&sa.sa_mask);
      sigaction(SIGBUS, &sa, &previous());
    });
  }

  // False if the access raised SIGBUS.
  static bool read(const void* address, uint64_t* out) {
    sigjmp_buf env;
    if (sigsetjmp(env, 1) != 0) {
      jump() = nullptr;
      return false;
    }
    jump() = &env;
    // The handler must see the jump buffer before the access can fault.
    std::atomic_signal_fence(std::memory_order_seq_cst);
    *out = *static_cast<const volatile uint64_t*>(address);
    std::atomic_signal_fence(std::memory_order_seq_cst);
    jump() = nullptr;
    return true;
  }
  static bool write(void* address, uint64_t value) {
    sigjmp_buf env;
    if (sigsetjmp(env, 1) != 0) {
      jump() = nullptr;
      return false;
    }
    jump() = &env;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    *static_cast<volatile uint64_t*>(address) = value;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    jump() = nullptr;
    return true;
  }

 private:
  static sigjmp_buf*& jump() {
    static thread_local sigjmp_buf* env = nullptr;
    return env;
  }
  static struct sigaction& previous() {
    static struct sigaction old {};
    return old;
  }
  static void handler(int sig, siginfo_t* info, void* context) {
    if (sigjmp_buf* env = jump()) siglongjmp(*env, 1);
    const struct sigaction& old = previous();
    if ((old.sa_flags & SA_SIGINFO) != 0 && old.sa_sigaction != nullptr) {
      old.sa_sigaction(sig, info, context);
    } else if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN) {
      old.sa_handler(sig);
    } else {
      signal(SIGBUS, SIG_DFL);  // the fault repeats and kills, as it would have
    }
  }
};

// The word the device keeps at `offset` in the tests' pattern.
inline uint64_t device_word(uint64_t offset, uint64_t generation) {
  return (offset * 0x9e3779b97f4a7c15ULL) ^ (generation << 56) ^ 0x00de51cedeadbeefULL;
}

}  // namespace iomm::test
