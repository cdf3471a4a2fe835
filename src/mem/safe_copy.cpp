#include "mem/safe_copy.hpp"

#include <pthread.h>
#include <ucontext.h>

#include <atomic>
#include <csetjmp>
#include <csignal>
#include <cstring>
#include <mutex>

namespace iomm::mem {

namespace {

// Where the SIGBUS handler jumps to while this thread is inside safe_copy.
// initial-exec keeps the handler's TLS access free of lazy allocation, which
// would not be async-signal-safe.
__attribute__((tls_model("initial-exec"))) thread_local sigjmp_buf* t_recovery = nullptr;

struct sigaction g_previous_action;
std::once_flag g_install_once;

void pass_to_previous_handler(int signo, siginfo_t* info, void* context) {
  const struct sigaction& previous = g_previous_action;
  if ((previous.sa_flags & SA_SIGINFO) == 0 && previous.sa_handler == SIG_IGN) return;
  if ((previous.sa_flags & SA_SIGINFO) == 0 && previous.sa_handler == SIG_DFL) {
    // Restoring the default and raising again terminates as if we had never
    // been installed: at once under SA_NODEFER, or on return if a wrapper
    // around us blocked SIGBUS.
    struct sigaction default_action {};
    default_action.sa_handler = SIG_DFL;
    sigaction(signo, &default_action, nullptr);
    raise(signo);
    return;
  }
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
  sigjmp_buf* recovery = t_recovery;
  // si_code <= 0 means the signal was sent (kill, tgkill, sigqueue), not
  // raised by a faulting access in the copy.
  if (recovery != nullptr && info != nullptr && info->si_code > 0) {
    t_recovery = nullptr;
    // siglongjmp restores no mask (see safe_copy). Put back the mask the
    // fault interrupted: whoever called us (the kernel, or a sanitizer's
    // wrapper that blocks every signal) may have widened it, and a SIGBUS
    // left blocked makes the kernel kill the process on the next fault.
    pthread_sigmask(SIG_SETMASK, &static_cast<const ucontext_t*>(context)->uc_sigmask, nullptr);
    siglongjmp(*recovery, 1);
  }
  pass_to_previous_handler(signo, info, context);
}

void install_sigbus_handler() {
  struct sigaction action {};
  action.sa_sigaction = on_sigbus;
  sigemptyset(&action.sa_mask);
  // SA_NODEFER leaves SIGBUS unblocked while we run, so a chained handler
  // gets exactly the mask its own flags ask for.
  action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  // Read the previous action first so that a SIGBUS arriving as soon as ours
  // is in place already finds where to go.
  sigaction(SIGBUS, nullptr, &g_previous_action);
  sigaction(SIGBUS, &action, nullptr);
}

}  // namespace

bool safe_copy(void* dst, const void* src, size_t n) noexcept {
  std::call_once(g_install_once, install_sigbus_handler);
  sigjmp_buf recovery;
  // Saving the signal mask would cost a syscall per copy; the handler
  // restores it itself on the rare fault.
  if (sigsetjmp(recovery, 0) != 0) return false;
  t_recovery = &recovery;
  // Keep the compiler from moving the copy out of the guarded window.
  std::atomic_signal_fence(std::memory_order_seq_cst);
  std::memcpy(dst, src, n);
  std::atomic_signal_fence(std::memory_order_seq_cst);
  t_recovery = nullptr;
  return true;
}

}  // namespace iomm::mem
