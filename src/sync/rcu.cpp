#include "sync/rcu.hpp"

#include <urcu/urcu-bp.h>

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

}  // namespace

namespace iomm {

RcuReadGuard::RcuReadGuard() noexcept {
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
  urcu_bp_synchronize_rcu();
  note_grace_period_end();
}

}  // namespace sync

}  // namespace iomm
