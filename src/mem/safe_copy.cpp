#include "mem/safe_copy.hpp"

#include <pthread.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <csetjmp>
#include <csignal>
#include <cstdint>
#include <cstring>

#include "core/check.hpp"
#include "iomm/guarded_copy.hpp"
#include "iomm/signals.hpp"

namespace iomm {

namespace mem {

namespace {

struct Recovery {
  sigjmp_buf jump;
  CopyWindow window;
};

// The copy running on this thread, if any. initial-exec keeps the handler's
// TLS access free of lazy allocation, which would not be async-signal-safe.
__attribute__((tls_model("initial-exec"))) thread_local Recovery* t_recovery = nullptr;

// Written by the same sigaction call that installs our handler.
struct sigaction g_previous_action;
std::atomic<bool> g_installed{false};

bool inside(const void* address, const void* start, size_t n) noexcept {
  const auto a = reinterpret_cast<uintptr_t>(address);
  const auto s = reinterpret_cast<uintptr_t>(start);
  return a >= s && a - s < n;
}

bool is_handler(const struct sigaction& action) noexcept {
  return (action.sa_flags & SA_SIGINFO) != 0 ||
         (action.sa_handler != SIG_IGN && action.sa_handler != SIG_DFL);
}

void restore_default(int signo) noexcept {
  struct sigaction default_action {};
  default_action.sa_handler = SIG_DFL;
  sigemptyset(&default_action.sa_mask);
  sigaction(signo, &default_action, nullptr);
}

// What the kernel would have done had we never been installed.
void pass_on(int signo, siginfo_t* info, void* context) noexcept {
  const struct sigaction& previous = g_previous_action;
  if (!is_handler(previous)) {
    // A fault raised by the interrupted instruction comes back when we
    // return; the kernel forces the default action on it even over SIG_IGN.
    // BUS_MCEERR_AO reports poisoned memory the thread is not touching, and
    // a sent signal (si_code <= 0) is not raised by an instruction: neither
    // comes back.
    const bool repeats = info->si_code >= BUS_ADRALN && info->si_code <= BUS_MCEERR_AR;
    if (previous.sa_handler == SIG_IGN && !repeats) return;
    restore_default(signo);
    // SA_NODEFER keeps SIGBUS unblocked here, so a queued signal is taken
    // (by the default action) as soon as the system call returns.
    if (!repeats) syscall(SYS_rt_tgsigqueueinfo, getpid(), gettid(), signo, info);
    return;
  }
  if ((previous.sa_flags & SA_RESETHAND) != 0) restore_default(signo);
  // Run it under the mask it asked for, as the kernel would have.
  sigset_t handler_mask = previous.sa_mask;
  if ((previous.sa_flags & SA_NODEFER) == 0) sigaddset(&handler_mask, signo);
  sigset_t saved_mask;
  pthread_sigmask(SIG_BLOCK, &handler_mask, &saved_mask);
  if ((previous.sa_flags & SA_SIGINFO) != 0) {
    previous.sa_sigaction(signo, info, context);
  } else {
    previous.sa_handler(signo);
  }
  pthread_sigmask(SIG_SETMASK, &saved_mask, nullptr);
}

void on_sigbus(int signo, siginfo_t* info, void* context) {
  Recovery* recovery = t_recovery;
  if (recovery != nullptr && classify_sigbus(*info, &recovery->window) == SigbusVerdict::recover) {
    t_recovery = nullptr;
    // siglongjmp restores no mask (see safe_copy). Put back the mask the
    // fault interrupted: whoever called us (the kernel, or a sanitizer's
    // wrapper that blocks every signal) may have widened it, and a SIGBUS
    // left blocked makes the kernel kill the process on the next fault.
    pthread_sigmask(SIG_SETMASK, &static_cast<const ucontext_t*>(context)->uc_sigmask, nullptr);
    siglongjmp(recovery->jump, 1);
  }
  pass_on(signo, info, context);
}

bool install_sigbus_handler() noexcept {
  struct sigaction action {};
  action.sa_sigaction = on_sigbus;
  sigemptyset(&action.sa_mask);
  // SA_NODEFER leaves SIGBUS unblocked while we run, so a chained handler
  // gets exactly the mask its own flags ask for.
  action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  // One call replaces the action and returns the one replaced: no other
  // thread can slip a change in between, as it could between a read and a
  // write.
  sigaction(SIGBUS, &action, &g_previous_action);
  g_installed.store(true, std::memory_order_release);
  return true;
}

}  // namespace

SigbusVerdict classify_sigbus(const siginfo_t& info, const CopyWindow* window) noexcept {
  if (window == nullptr) return SigbusVerdict::pass_on;
  // Only a page that vanished (a truncated file) under the copy's own
  // ranges, or a poisoned one where the copy asked for it (Recover).
  // BUS_MCEERR_AO is poison the copy did not touch; alignment faults and
  // sent signals are not ours.
  const bool vanished = info.si_code == BUS_ADRERR || info.si_code == BUS_OBJERR;
  const bool poisoned =
      info.si_code == BUS_MCEERR_AR && window->recover == Recover::vanished_or_poisoned;
  if (!vanished && !poisoned) return SigbusVerdict::pass_on;
  if (inside(info.si_addr, window->dst, window->n) ||
      inside(info.si_addr, window->src, window->n)) {
    return SigbusVerdict::recover;
  }
  return SigbusVerdict::pass_on;
}

bool safe_copy(void* dst, const void* src, size_t n, Recover recover) noexcept {
  IOMM_CHECK(g_installed.load(std::memory_order_relaxed),
             "safe_copy without the SIGBUS handler (iomm::install_signal_handlers)");
  Recovery recovery;
  recovery.window = CopyWindow{dst, src, n, recover};
  // Saving the signal mask would cost a syscall per copy; the handler
  // restores it itself on the rare fault.
  if (sigsetjmp(recovery.jump, 0) != 0) return false;
  t_recovery = &recovery;
  // Keep the compiler from moving the copy out of the guarded window.
  std::atomic_signal_fence(std::memory_order_seq_cst);
  std::memcpy(dst, src, n);
  std::atomic_signal_fence(std::memory_order_seq_cst);
  t_recovery = nullptr;
  return true;
}

}  // namespace mem

Status guarded_copy(void* dst, const void* src, size_t n) noexcept {
  install_signal_handlers();
  if (!mem::safe_copy(dst, src, n, mem::Recover::vanished_or_poisoned)) {
    return Error(EFAULT, "guarded_copy: the memory was revoked or truncated (SIGBUS)");
  }
  return {};
}

void install_signal_handlers() noexcept {
  // A function-local static is initialised exactly once, even when threads race.
  [[maybe_unused]] static const bool installed = mem::install_sigbus_handler();
}

}  // namespace iomm
