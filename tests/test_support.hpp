// Shared helpers for the iomm tests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "iomm/accounting.hpp"
#include "iomm/result.hpp"

namespace iomm::test {

// Whether a test memfd may shrink.
enum class Shrink {
  // F_SEAL_SHRINK added after sizing it, as MemorySource::from_file wants
  // by default (FileSeal::shrink).
  sealed,
  // No seal and no MFD_ALLOW_SEALING: from_file needs
  // FileSeal::allow_shrink (for tests about shrinking files).
  allowed,
};

// An anonymous memfd of `size` bytes, closed on destruction.
class Memfd {
 public:
  explicit Memfd(uint64_t size, unsigned flags = 0, Shrink shrink = Shrink::sealed);
  ~Memfd();
  Memfd(const Memfd&) = delete;
  Memfd& operator=(const Memfd&) = delete;
  [[nodiscard]] int fd() const noexcept { return fd_; }

 private:
  int fd_ = -1;
};

// Drops CAP_IPC_LOCK from this thread's effective set so the memlock limit
// applies to mappings it creates; restores it on destruction.
class WithoutIpcLock {
 public:
  WithoutIpcLock();
  ~WithoutIpcLock();
  WithoutIpcLock(const WithoutIpcLock&) = delete;
  WithoutIpcLock& operator=(const WithoutIpcLock&) = delete;

 private:
  bool had_ = false;
};

// Whether a 2 MiB hugetlb memfd of `size` can be created and populated here.
bool hugetlb_available(uint64_t size);

// Whether a missing machine feature must fail the test instead of skipping
// it: in CI (CI=true) and under scripts/test (IOMM_REQUIRE_ALL=1), where the
// machine is set up to have every feature, a skip would hide a check that
// did not run.
bool require_all();

// Whether this process runs as root (effective uid 0).
bool is_root();

// Whether this process may reopen its mappings' files through
// /proc/self/map_files (CAP_SYS_ADMIN).
bool can_reopen_map_files();

// Runs body in a forked child that is an ordinary user: if the test runs as
// root, the child first becomes uid/gid 65534 (nobody), which clears every
// capability. Returns the child's exit status: 0 when body recorded no
// failure (gtest assertions work in body; their messages go to stdout).
int run_unprivileged(const std::function<void()>& body);

}  // namespace iomm::test

// A test that needs a machine feature (huge pages, userfaultfd): skips with
// "needs <what>" where the feature may be missing, fails where require_all().
#define IOMM_NEEDS(available, what)                                                      \
  do {                                                                                   \
    if (!(available)) {                                                                  \
      if (::iomm::test::require_all()) {                                                 \
        GTEST_FAIL() << "needs " << (what) << " (required: CI or IOMM_REQUIRE_ALL set)"; \
      }                                                                                  \
      GTEST_SKIP() << "needs " << (what);                                                \
    }                                                                                    \
  } while (0)

// A test that truly needs root skips as an ordinary user, saying why; the
// unprivileged CI stage counts it as skipped.
#define IOMM_NEEDS_ROOT(why)                                               \
  do {                                                                     \
    if (!::iomm::test::is_root()) GTEST_SKIP() << "needs root: " << (why); \
  } while (0)

// Assert a Result/Status failed with exactly this errno.
#define EXPECT_ERRNO(expr, err)                                               \
  do {                                                                        \
    const auto& result_ = (expr);                                             \
    EXPECT_EQ(result_.code(), (err))                                          \
        << #expr << " gave " << ::iomm::errno_name(result_.code())            \
        << (result_.ok() ? std::string() : ": " + result_.error().message()); \
  } while (0)

#define ASSERT_OK(expr)                                                       \
  do {                                                                        \
    const auto& result_ = (expr);                                             \
    ASSERT_TRUE(result_.ok()) << #expr << ": " << result_.error().describe(); \
  } while (0)

#define EXPECT_OK(expr)                                                       \
  do {                                                                        \
    const auto& result_ = (expr);                                             \
    EXPECT_TRUE(result_.ok()) << #expr << ": " << result_.error().describe(); \
  } while (0)
