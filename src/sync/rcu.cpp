#include "sync/rcu.hpp"

#include <urcu/urcu-bp.h>

#include <atomic>

#include "iomm/rcu.hpp"

// ThreadSanitizer does not see the ordering liburcu provides (its barriers
// live in uninstrumented code), so it would report every unpin or unmap after
// a grace period as racing with the readers that ran before it. Model the
// guarantee for it: each read section ends with a release and every grace
// period ends with an acquire on the same token.
#if defined(__SANITIZE_THREAD__)
#define IOMM_TSAN_ANNOTATE 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define IOMM_TSAN_ANNOTATE 1
#endif
#endif

#if defined(IOMM_TSAN_ANNOTATE)
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
#endif

namespace {

#if defined(IOMM_TSAN_ANNOTATE)
char grace_period_token;
void note_read_section_end() { __tsan_release(&grace_period_token); }
void note_grace_period_end() { __tsan_acquire(&grace_period_token); }
#else
void note_read_section_end() {}
void note_grace_period_end() {}
#endif

// Whether any thread of the process has ever entered a read-side section.
// Until one has, no reader can hold anything a writer retires, and a grace
// period is skipped: liburcu-bp would find its reader registry empty too,
// but only after blocking and restoring every signal, two system calls that
// were most of a detach's grace period (a system call costs about 1 us on
// the benchmark VM). Never reset: a thread that has read may read again.
std::atomic<bool> g_readers_seen{false};

}  // namespace

namespace iomm {

RcuReadGuard::RcuReadGuard() noexcept {
  // Dekker-style against rcu_synchronize(): the reader stores the flag and
  // then reads through the pointers (urcu_bp_read_lock ends in a full
  // barrier); the writer unpublishes, fences and then loads the flag. Either
  // the writer sees the flag and waits, or the reader sees the unpublished
  // state. A reader that finds the flag set already is ordered after the
  // store that set it, which the writer's check is ordered against.
  if (!g_readers_seen.load(std::memory_order_relaxed)) [[unlikely]] {
    g_readers_seen.store(true, std::memory_order_seq_cst);
  }
  urcu_bp_read_lock();
  ++sync::t_read_depth;
}

RcuReadGuard::~RcuReadGuard() {
  --sync::t_read_depth;
  note_read_section_end();
  urcu_bp_read_unlock();
}

namespace sync {

[[gnu::tls_model("initial-exec")]] constinit thread_local unsigned t_read_depth = 0;

void rcu_synchronize() noexcept {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (g_readers_seen.load(std::memory_order_seq_cst)) urcu_bp_synchronize_rcu();
  note_grace_period_end();
}

}  // namespace sync

}  // namespace iomm
