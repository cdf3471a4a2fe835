// The per-thread record behind the debug lock-order check
// (sync/ranked_mutex.hpp).
#include <cstdio>
#include <cstdlib>

#include "sync/ranked_mutex.hpp"

namespace iomm::sync::lock_order {

namespace {

struct Held {
  LockRank rank;
  const char* name;
  const void* lock;
};

// Deeper nesting than this is itself a bug; a fixed array keeps the check
// allocation-free (it runs on paths that must not fail).
constexpr int kMaxHeld = 32;
constinit thread_local Held t_held[kMaxHeld] = {};
constinit thread_local int t_count = 0;

[[noreturn]] void die(const char* what, const char* name, LockRank rank, const Held* other) {
  if (other != nullptr) {
    std::fprintf(stderr,
                 "iomm: lock order violation: acquiring %s (rank %u) while holding %s (rank %u); "
                 "see docs/design.md, \"Lock order\"\n",
                 name, static_cast<unsigned>(rank), other->name,
                 static_cast<unsigned>(other->rank));
  } else {
    std::fprintf(stderr, "iomm: %s: %s (rank %u)\n", what, name, static_cast<unsigned>(rank));
  }
  std::abort();
}

}  // namespace

void acquired(LockRank rank, const char* name, const void* lock, bool trying) noexcept {
  if (!trying) {
    for (int i = 0; i < t_count; ++i) {
      if (t_held[i].rank >= rank) die("", name, rank, &t_held[i]);
    }
  }
  if (t_count == kMaxHeld) die("too many locks held by one thread", name, rank, nullptr);
  t_held[t_count++] = Held{rank, name, lock};
}

void released(const void* lock) noexcept {
  // Usually the newest; unique_lock and condition waits may release out of
  // order.
  for (int i = t_count - 1; i >= 0; --i) {
    if (t_held[i].lock == lock) {
      for (int j = i; j + 1 < t_count; ++j) t_held[j] = t_held[j + 1];
      --t_count;
      return;
    }
  }
}

}  // namespace iomm::sync::lock_order
