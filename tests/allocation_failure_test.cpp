// Calls that promise no exceptions keep that promise when memory runs out:
// the heap runs out at each allocation of the call in turn (from the nth
// allocation of this thread on, operator new, replaced here, throws
// std::bad_alloc), and each run must return success with a usable result or
// ENOMEM, never unwind into the caller.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <new>
#include <vector>

#include "iomm/access.hpp"
#include "iomm/accounting.hpp"
#include "iomm/domain.hpp"
#include "test_support.hpp"

namespace {

// -1: off. Otherwise the number of allocations this thread may still make
// before every further one fails.
thread_local long allocations_left = -1;
thread_local bool allocation_failed = false;

}  // namespace

void* operator new(std::size_t size) {
  if (allocations_left == 0) {
    allocation_failed = true;
    throw std::bad_alloc();
  }
  if (allocations_left > 0) --allocations_left;
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}

// Every other non-aligned form too: the sanitizer runtimes provide their
// own, which must not pair with ours.
void* operator new[](std::size_t size) { return operator new(size); }
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  try {
    return operator new(size);
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
}
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {
  return operator new(size, std::nothrow);
}
// These replace operator new too, with malloc, so free is the matching
// release; GCC inlines a std::allocator's ::operator new into its callers and
// then takes the free for a mismatch.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
#pragma GCC diagnostic pop

namespace iomm {
namespace {

constexpr uint32_t kRW = kProtRead | kProtWrite;

// Runs call with allocation n failing, for n = 0, 1, ... until a run makes
// no allocation fail. check(result, failed) then judges each result.
template <typename Call, typename Check>
void fail_each_allocation(const char* what, Call call, Check check) {
  for (long n = 0;; ++n) {
    allocation_failed = false;
    allocations_left = n;
    bool escaped = false;
    try {
      auto result = call();
      allocations_left = -1;
      check(result, allocation_failed);
    } catch (...) {
      allocations_left = -1;
      escaped = true;
    }
    ASSERT_FALSE(escaped) << what << ": an exception escaped when allocation " << n << " failed";
    if (!allocation_failed) {
      std::printf("[allocation failure] %s: %ld runs\n", what, n + 1);
      return;
    }
    ASSERT_LT(n, 10000) << what << ": no end";
  }
}

template <typename R>
void expect_ok_or_enomem(const R& r, bool failed) {
  if (!failed) {
    EXPECT_TRUE(r.ok()) << r.error().describe();
  } else if (!r.ok()) {
    EXPECT_EQ(r.code(), ENOMEM) << r.error().describe();
  }
}

TEST(AllocationFailure, IoasCreateIsEnomemOrAnIoas) {
  fail_each_allocation(
      "Ioas::create", [] { return Ioas::create({}); },
      [](const Result<std::shared_ptr<Ioas>>& r, bool failed) {
        expect_ok_or_enomem(r, failed);
        if (r.ok()) {
          EXPECT_NE(r.value(), nullptr);
        }
      });
}

TEST(AllocationFailure, AccessCreateIsEnomemOrAnAccess) {
  auto ioas = Ioas::create({}).value();
  fail_each_allocation(
      "Access::create", [&] { return Access::create(ioas, [](const IovaRange&) {}); },
      [&](const Result<std::shared_ptr<Access>>& r, bool failed) {
        expect_ok_or_enomem(r, failed);
        if (r.ok()) {
          EXPECT_NE(r.value(), nullptr);
        }
        EXPECT_EQ(ioas->counters().accesses, r.ok() ? 1U : 0U);
      });
}

TEST(AllocationFailure, MapWithANewOwnerIsEnomemOrAMapping) {
  test::WithoutIpcLock charged;  // so the mapping has an owner to create
  IoasOptions options;
  options.account_mode = AccountMode::per_user;
  auto ioas = Ioas::create(options).value();
  auto domain = SoftDomain::create({}).value();
  ASSERT_OK(ioas->attach(domain));
  auto src = MemorySource::simulated(16 * kPageSize).value();
  int uid = 70000;
  fail_each_allocation(
      "Ioas::map_as",
      [&] { return ioas->map_as(src, kRW, 0x100000, OwnerSpec{.pid = 0, .uid = ++uid}); },
      [&](const Result<uint64_t>& r, bool failed) {
        expect_ok_or_enomem(r, failed);
        EXPECT_EQ(ioas->counters().mappings, r.ok() ? 1U : 0U);
        EXPECT_EQ(counters().simulated_pinned_bytes, r.ok() ? 16 * kPageSize : 0U);
        if (r.ok()) {
          EXPECT_OK(ioas->unmap(0x100000, 16 * kPageSize));
        }
      });
  ASSERT_OK(ioas->detach(domain));
}

TEST(AllocationFailure, PinsAttachAndCopyAreEnomemOrDone) {
  test::Memfd mfd(1 << 20);
  auto ioas = Ioas::create({}).value();
  auto other = Ioas::create({}).value();
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, 1 << 20), kRW, 0x100000));
  auto access = Access::create(ioas, [](const IovaRange&) {}).value();
  fail_each_allocation(
      "Access::pin", [&] { return access->pin(0x101000, 4 * kPageSize, kRW); },
      [&](const Result<std::vector<PinnedSegment>>& r, bool failed) {
        expect_ok_or_enomem(r, failed);
        EXPECT_EQ(access->pin_count(), r.ok() ? 1U : 0U);
        if (r.ok()) {
          EXPECT_OK(access->unpin(0x101000, 4 * kPageSize));
        }
        EXPECT_EQ(counters().pinned_bytes, 0U);
      });
  void* host[3] = {};
  fail_each_allocation(
      "Access::pin_pages", [&] { return access->pin_pages(0x10F000, 3, kRW, host); },
      [&](const Status& s, bool failed) {
        expect_ok_or_enomem(s, failed);
        EXPECT_EQ(access->page_pinned_count(), s.ok() ? 3U : 0U);
        if (s.ok()) {
          EXPECT_OK(access->unpin_pages(0x10F000, 3));
        }
        EXPECT_EQ(counters().pinned_bytes, 0U);
      });
  auto domain = SoftDomain::create({}).value();
  fail_each_allocation(
      "Ioas::attach", [&] { return ioas->attach(domain); },
      [&](const Status& s, bool failed) {
        expect_ok_or_enomem(s, failed);
        EXPECT_EQ(ioas->counters().domains, s.ok() ? 1U : 0U);
        EXPECT_EQ(domain->counters().table_pages, s.ok() ? 4U : 1U);
        if (s.ok()) {
          EXPECT_OK(ioas->detach(domain));
        }
        EXPECT_EQ(counters().pinned_bytes, 0U);
      });
  fail_each_allocation(
      "Ioas::copy_from", [&] { return other->copy_from(*ioas, 0x100000, 1 << 20, kRW); },
      [&](const Result<uint64_t>& r, bool failed) {
        expect_ok_or_enomem(r, failed);
        EXPECT_EQ(other->counters().mappings, r.ok() ? 1U : 0U);
        if (r.ok()) {
          EXPECT_OK(other->unmap_all());
        }
      });
}

// Per-page pins taken in runs (one pin store call per run) and dropped page
// by page, in any pattern, with segment pins of a domain over some of them:
// no unpin allocates (every allocation would fail here).
TEST(AllocationFailure, UnpinPagesNeverAllocates) {
  test::WithoutIpcLock charged;
  ASSERT_OK(set_memlock_limit(AccountMode::per_process, 0, 64 << 20));
  test::Memfd mfd(4 << 20);
  auto ioas = Ioas::create({}).value();
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, 2 << 20), kRW, 0x400000));
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 2 << 20, 2 << 20), kRW, 0x600000));
  auto access = Access::create(ioas, [](const IovaRange&) {}).value();
  std::vector<void*> host(512);
  for (bool with_domain : {false, true}) {
    std::shared_ptr<SoftDomain> domain;
    if (with_domain) {
      domain = SoftDomain::create({}).value();
      ASSERT_OK(ioas->attach(domain));
    }
    ASSERT_OK(access->pin_pages(0x500000, 512, kRW, host.data()));  // across both mappings
    ASSERT_OK(access->pin_pages(0x5FE000, 4, kRW, host.data()));    // counts of 2
    const uint64_t pinned = counters().pinned_bytes;
    allocation_failed = false;
    allocations_left = 0;
    for (uint64_t i = 0; i < 512; i += 3) {
      EXPECT_OK(access->unpin_pages(0x500000 + i * kPageSize, 1));
    }
    EXPECT_OK(access->unpin_pages(0x5FE000, 4));
    for (uint64_t i = 0; i < 512; ++i) {
      if (i % 3 != 0) EXPECT_OK(access->unpin_pages(0x500000 + i * kPageSize, 1));
    }
    allocations_left = -1;
    EXPECT_FALSE(allocation_failed);
    EXPECT_EQ(access->page_pinned_count(), 0U);
    EXPECT_EQ(pinned, with_domain ? uint64_t{4 << 20} : uint64_t{2 << 20});
    EXPECT_EQ(counters().pinned_bytes, with_domain ? uint64_t{4 << 20} : 0U);
    if (with_domain) {
      ASSERT_OK(ioas->detach(domain));
    }
    EXPECT_EQ(counters().pinned_bytes, 0U);
    EXPECT_EQ(counters().charged_bytes, 0U);
  }
}

TEST(AllocationFailure, SetMemlockLimitForANewOwnerIsEnomemOrSet) {
  int uid = 80000;
  fail_each_allocation(
      "set_memlock_limit",
      [&] { return set_memlock_limit(AccountMode::per_user, ++uid, kPageSize); },
      [](const Status& s, bool failed) { expect_ok_or_enomem(s, failed); });
}

}  // namespace
}  // namespace iomm
