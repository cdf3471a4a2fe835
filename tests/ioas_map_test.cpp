// IOAS map, IOVA allocation, reserved and allowed ranges, unmap rules.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cstring>
#include <vector>

#include "iomm/ioas.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

constexpr uint32_t kRW = kProtRead | kProtWrite;

std::shared_ptr<Ioas> make_ioas(IoasOptions o = {}) {
  auto r = Ioas::create(o);
  EXPECT_TRUE(r.ok());
  return r.value();
}

MemorySource sim(uint64_t length) { return MemorySource::simulated(length).value(); }

std::shared_ptr<SoftDomain> make_domain(DomainConfig c = {}) {
  auto d = SoftDomain::create(c);
  EXPECT_TRUE(d.ok());
  return d.value();
}

TEST(IoasMap, FixedIovaRoundTrip) {
  auto ioas = make_ioas();
  auto iova = ioas->map(sim(1 << 20), kRW, 0x100000);
  ASSERT_OK(iova);
  EXPECT_EQ(*iova, 0x100000U);
  ASSERT_EQ(ioas->mappings().size(), 1U);
  EXPECT_EQ(ioas->mappings()[0].length, 1U << 20);
  EXPECT_FALSE(ioas->mappings()[0].pinned);  // no domain: lazy
  auto bytes = ioas->unmap(0x100000, 1 << 20);
  ASSERT_OK(bytes);
  EXPECT_EQ(*bytes, 1U << 20);
  EXPECT_EQ(ioas->counters().mappings, 0U);
}

TEST(IoasMap, ArgumentErrorsInOrder) {
  auto ioas = make_ioas();
  auto s = sim(2 * kPageSize);
  EXPECT_ERRNO(ioas->map(s, kRW, UINT64_MAX), EOVERFLOW);
  auto huge = MemorySource::from_user(nullptr, UINT64_MAX);
  ASSERT_OK(huge);
  EXPECT_ERRNO(ioas->map(*huge, kRW, 0x1000), EOVERFLOW);
  EXPECT_ERRNO(ioas->map(s, 0, 0x1000), EINVAL);
  EXPECT_ERRNO(ioas->map(s, kRW | 0x80, 0x1000), EINVAL);
  EXPECT_ERRNO(ioas->map(s, kRW, UINT64_MAX - kPageSize + 1), EOVERFLOW);  // wraps
  EXPECT_EQ(ioas->counters().mappings, 0U);
}

TEST(IoasMap, TopOfTheAddressSpace) {
  auto ioas = make_ioas();
  const uint64_t top = UINT64_MAX - kPageSize + 1;
  ASSERT_OK(ioas->map(sim(kPageSize), kRW, top));
  EXPECT_ERRNO(ioas->map(sim(kPageSize), kRW, top), EEXIST);
  EXPECT_ERRNO(ioas->unmap(top, kPageSize + 1), EOVERFLOW);
  EXPECT_ERRNO(ioas->unmap(top, UINT64_MAX), EOVERFLOW);
  auto bytes = ioas->unmap(top, kPageSize);
  ASSERT_OK(bytes);
  EXPECT_EQ(*bytes, kPageSize);
  // Byte-granular at the very top with no domain: [MAX, MAX].
  ASSERT_OK(ioas->map(sim(1), kProtRead, UINT64_MAX - 1));
  EXPECT_ERRNO(ioas->unmap(UINT64_MAX - 1, 3), EOVERFLOW);
  auto top_byte = ioas->unmap(UINT64_MAX - 1, 2);  // [MAX-1, MAX]: ends exactly at the top
  ASSERT_OK(top_byte);
  EXPECT_EQ(*top_byte, 1U);
}

TEST(IoasMap, OverlapAndReservedAndReadOnly) {
  auto ioas = make_ioas();
  ASSERT_OK(ioas->map(sim(4 * kPageSize), kRW, 0x10000));
  EXPECT_ERRNO(ioas->map(sim(kPageSize), kRW, 0x13000), EEXIST);
  EXPECT_ERRNO(ioas->map(sim(4 * kPageSize), kRW, 0xE000), EEXIST);
  ASSERT_OK(ioas->add_reserved({0x100000, 0x1FFFFF}));
  EXPECT_ERRNO(ioas->map(sim(kPageSize), kRW, 0x1FF000), EINVAL);
  EXPECT_ERRNO(ioas->map(sim(kPageSize), kRW, 0x0FF000 + kPageSize), EINVAL);
  int buf = 0;
  auto ro = MemorySource::from_user(&buf, sizeof(buf), false);
  ASSERT_OK(ro);
  EXPECT_ERRNO(ioas->map(*ro, kRW, 0x400000), EPERM);
  EXPECT_TRUE(ioas->map(*ro, kProtRead, 0x400000).ok());
  EXPECT_EQ(ioas->counters().mappings, 2U);
}

TEST(IoasMap, MappingLimit) {
  IoasOptions o;
  o.max_mappings = 3;
  auto ioas = make_ioas(o);
  for (int i = 0; i < 3; ++i) ASSERT_OK(ioas->map(sim(kPageSize), kRW));
  EXPECT_ERRNO(ioas->map(sim(kPageSize), kRW), ENOSPC);
  EXPECT_ERRNO(ioas->map(sim(kPageSize), kRW, 0x900000), ENOSPC);
  IoasOptions zero;
  zero.max_mappings = 0;
  EXPECT_ERRNO(Ioas::create(zero), EINVAL);
  EXPECT_EQ(kDefaultMaxMappings, 65535U);
  EXPECT_EQ(make_ioas()->options().max_mappings, 65535U);
}

TEST(IoasMap, AllocationIsFirstFitAlignedAndNeverZero) {
  auto ioas = make_ioas();
  auto a = ioas->map(sim(1 << 20), kRW);
  auto b = ioas->map(sim(1 << 20), kRW);
  auto c = ioas->map(sim(kPageSize), kRW);
  ASSERT_OK(a);
  ASSERT_OK(b);
  ASSERT_OK(c);
  EXPECT_EQ(*a, 1U << 20);  // aligned to roundup_pow2(length), above page 0
  EXPECT_EQ(*b, 2U << 20);
  EXPECT_EQ(*c, kPageSize);  // first fit goes back to the hole below
  ASSERT_OK(ioas->unmap(*a, 1 << 20));
  auto d = ioas->map(sim(1 << 20), kRW);
  ASSERT_OK(d);
  EXPECT_EQ(*d, 1U << 20);
}

TEST(IoasMap, AllocationKeepsOffsetWithinPage) {
  auto ioas = make_ioas();
  std::vector<char> buf(3 * kPageSize);
  char* p = buf.data() +
            ((kPageSize - reinterpret_cast<uintptr_t>(buf.data()) % kPageSize) % kPageSize) + 0x123;
  auto src = MemorySource::from_user(p, 100);
  ASSERT_OK(src);
  auto iova = ioas->map(*src, kRW);
  ASSERT_OK(iova);
  EXPECT_EQ(*iova % kPageSize, 0x123U);
  EXPECT_NE(*iova, 0U);
}

TEST(IoasMap, AllowedRangesRestrictAllocationOnly) {
  auto ioas = make_ioas();
  const IovaRange allowed[] = {{0x40000000, 0x4FFFFFFF}};
  ASSERT_OK(ioas->set_allowed_ranges(allowed));
  auto a = ioas->map(sim(1 << 20), kRW);
  ASSERT_OK(a);
  EXPECT_EQ(*a, 0x40000000U);
  EXPECT_TRUE(ioas->map(sim(kPageSize), kRW, 0x1000).ok());  // fixed IOVA outside is fine
  const IovaRange tiny[] = {{0x1000, 0x1FFF}};
  ASSERT_OK(ioas->unmap(0x1000, kPageSize));
  ASSERT_OK(ioas->set_allowed_ranges(tiny));
  EXPECT_ERRNO(ioas->map(sim(2 * kPageSize), kRW), ENOSPC);
  ASSERT_OK(ioas->set_allowed_ranges({}));
}

TEST(IoasMap, AllowedAndReservedExcludeEachOther) {
  auto ioas = make_ioas();
  const IovaRange bad[] = {{0x2000, 0x1000}};
  EXPECT_ERRNO(ioas->set_allowed_ranges(bad), EINVAL);
  const IovaRange overlapping[] = {{0x1000, 0x2FFF}, {0x2000, 0x3FFF}};
  EXPECT_ERRNO(ioas->set_allowed_ranges(overlapping), EINVAL);
  ASSERT_OK(ioas->add_reserved({0x10000, 0x1FFFF}));
  const IovaRange over_reserved[] = {{0x18000, 0x28000}};
  EXPECT_ERRNO(ioas->set_allowed_ranges(over_reserved), EADDRINUSE);
  const IovaRange ok[] = {{0x100000, 0x1FFFFF}};
  ASSERT_OK(ioas->set_allowed_ranges(ok));
  EXPECT_ERRNO(ioas->add_reserved({0x1F0000, 0x2FFFFF}), EADDRINUSE);
  ASSERT_OK(ioas->map(sim(kPageSize), kRW, 0x500000));
  EXPECT_ERRNO(ioas->add_reserved({0x500000, 0x500000}), EADDRINUSE);
  EXPECT_ERRNO(ioas->add_reserved({5, 4}), EINVAL);
  EXPECT_ERRNO(ioas->remove_reserved({0x10000, 0x10FFF}), ENOENT);
  ASSERT_OK(ioas->remove_reserved({0x10000, 0x1FFFF}));
}

TEST(IoasMap, AllocationNeverWrapsPastReservations) {
  auto ioas = make_ioas();
  ASSERT_OK(ioas->add_reserved({0x1000, UINT64_MAX - 1}));
  EXPECT_ERRNO(ioas->map(sim(kPageSize), kRW), ENOSPC);
  EXPECT_ERRNO(ioas->map(*MemorySource::from_user(nullptr, UINT64_MAX / 2), kRW), EOVERFLOW);
}

TEST(IoasMap, IovaRangesAreHolesInReservations) {
  auto ioas = make_ioas();
  EXPECT_EQ(ioas->iova_ranges(), (std::vector<IovaRange>{{0, UINT64_MAX}}));
  ASSERT_OK(ioas->add_reserved({0x1000, 0x1FFF}));
  ASSERT_OK(ioas->add_reserved({UINT64_MAX - 0xFFF, UINT64_MAX}));
  EXPECT_EQ(ioas->iova_ranges(),
            (std::vector<IovaRange>{{0, 0xFFF}, {0x2000, UINT64_MAX - 0x1000}}));
}

TEST(IoasMap, AlignmentFollowsTheDomain) {
  auto ioas = make_ioas();
  EXPECT_EQ(ioas->counters().iova_alignment, 1U);
  auto d = make_domain();
  ASSERT_OK(ioas->attach(d));
  EXPECT_EQ(ioas->counters().iova_alignment, kPageSize);
  EXPECT_ERRNO(ioas->map(sim(kPageSize), kRW, 0x1800), EINVAL);
  EXPECT_ERRNO(ioas->map(sim(kPageSize + 1), kRW, 0x2000), EINVAL);
  ASSERT_OK(ioas->detach(d));
  EXPECT_EQ(ioas->counters().iova_alignment, 1U);
  EXPECT_TRUE(ioas->map(sim(kPageSize), kRW, 0x1800).ok());
}

TEST(IoasUnmap, NeverSplitsAndAllowsHoles) {
  auto ioas = make_ioas();
  ASSERT_OK(ioas->map(sim(4 * kPageSize), kRW, 0x10000));
  ASSERT_OK(ioas->map(sim(4 * kPageSize), kRW, 0x20000));
  EXPECT_ERRNO(ioas->unmap(0x10000, kPageSize), ENOENT);
  EXPECT_ERRNO(ioas->unmap(0x11000, 4 * kPageSize), ENOENT);
  EXPECT_ERRNO(ioas->unmap(0x0, 0x21000), ENOENT);  // cuts the second
  EXPECT_EQ(ioas->counters().mappings, 2U);
  auto bytes = ioas->unmap(0x8000, 0x20000);  // both, with holes around
  ASSERT_OK(bytes);
  EXPECT_EQ(*bytes, 8 * kPageSize);
}

TEST(IoasUnmap, EmptyRangeAndArguments) {
  auto ioas = make_ioas();
  EXPECT_ERRNO(ioas->unmap(0x1000, kPageSize), ENOENT);
  auto empty = ioas->unmap_range_allow_empty(0x1000, kPageSize);
  ASSERT_OK(empty);
  EXPECT_EQ(*empty, 0U);
  EXPECT_ERRNO(ioas->unmap(0x1000, 0), EINVAL);
  EXPECT_ERRNO(ioas->unmap(UINT64_MAX, 1), EOVERFLOW);
  EXPECT_ERRNO(ioas->unmap(3, UINT64_MAX - 1), EOVERFLOW);
  EXPECT_ERRNO(ioas->unmap(2, UINT64_MAX - 1), ENOENT);  // [2, MAX] is valid and empty
  auto all = ioas->unmap_all();
  ASSERT_OK(all);
  EXPECT_EQ(*all, 0U);
  ASSERT_OK(ioas->map(sim(kPageSize), kRW, 0));
  ASSERT_OK(ioas->map(sim(kPageSize), kRW, UINT64_MAX - kPageSize + 1));
  all = ioas->unmap_all();
  ASSERT_OK(all);
  EXPECT_EQ(*all, 2 * kPageSize);
}

TEST(IoasLazy, UnmappedUserAddressMapsThenFaultsAtAttach) {
  auto ioas = make_ioas();
  void* hole = mmap(nullptr, 16 * kPageSize, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(hole, MAP_FAILED);
  ASSERT_EQ(munmap(hole, 16 * kPageSize), 0);
  auto src = MemorySource::from_user(hole, 16 * kPageSize);
  ASSERT_OK(src);
  ASSERT_OK(ioas->map(*src, kRW, 0x100000));  // lazy: touches nothing
  auto d = make_domain();
  EXPECT_ERRNO(ioas->attach(d), EFAULT);
  // Nothing changed: still mapped, not pinned, domain free to attach elsewhere.
  EXPECT_EQ(ioas->counters().domains, 0U);
  EXPECT_EQ(ioas->counters().mappings, 1U);
  EXPECT_EQ(ioas->counters().iova_alignment, 1U);
  EXPECT_EQ(counters().pinned_bytes, 0U);
  EXPECT_ERRNO(ioas->detach(d), ENOENT);
  auto other = make_ioas();
  ASSERT_OK(other->attach(d));
  ASSERT_OK(other->detach(d));
}

TEST(IoasLazy, MapWithDomainIsAllOrNothing) {
  auto ioas = make_ioas();
  auto d = make_domain();
  ASSERT_OK(ioas->attach(d));
  // Half mapped, half not: the pin fails part-way and nothing may remain.
  auto* buf = static_cast<char*>(
      mmap(nullptr, 8 * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(buf, MAP_FAILED);
  ASSERT_EQ(munmap(buf + 4 * kPageSize, 4 * kPageSize), 0);
  auto src = MemorySource::from_user(buf, 8 * kPageSize);
  ASSERT_OK(src);
  EXPECT_ERRNO(ioas->map(*src, kRW, 0x100000), EFAULT);
  EXPECT_EQ(ioas->counters().mappings, 0U);
  EXPECT_EQ(counters().pinned_bytes, 0U);
  EXPECT_EQ(process_vmlck_bytes(), 0U);
  EXPECT_ERRNO(d->translate(0x100000, kProtRead), EFAULT);
  // The IOVA is free again.
  auto good = MemorySource::from_user(buf, 4 * kPageSize);
  ASSERT_OK(ioas->map(*good, kRW, 0x100000));
  EXPECT_EQ(counters().pinned_bytes, 4 * kPageSize);
  ASSERT_OK(ioas->unmap_all());
  ASSERT_OK(ioas->detach(d));
  munmap(buf, 4 * kPageSize);
}

// A page already pinned for a read-only mapping is not thereby writable: a
// writable mapping of read-only memory fails to pin (EFAULT) whether or not
// another mapping holds its pages, and leaves nothing behind. (Found by the
// IOAS sequence fuzzer's concurrent rounds: two lanes mapping the same
// read-only page, R and W.)
TEST(IoasLazy, WritableMapOfReadOnlyMemoryHeldForReadFails) {
  auto ioas = make_ioas();
  auto d = make_domain();
  ASSERT_OK(ioas->attach(d));
  auto* buf = static_cast<char*>(
      mmap(nullptr, 2 * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(buf, MAP_FAILED);
  std::memset(buf, 'r', 2 * kPageSize);
  ASSERT_EQ(mprotect(buf, 2 * kPageSize, PROT_READ), 0);
  auto src = MemorySource::from_user(buf, 2 * kPageSize, /*writable=*/true);
  ASSERT_OK(src);
  EXPECT_ERRNO(ioas->map(*src, kProtWrite, 0x100000), EFAULT);
  ASSERT_OK(ioas->map(src->slice(0, kPageSize), kProtRead, 0x200000));
  const uint64_t pinned = counters().pinned_bytes;
  const uint64_t charged = counters().charged_bytes;
  // One page held for read and one not, then the held page alone.
  EXPECT_ERRNO(ioas->map(*src, kProtWrite, 0x300000), EFAULT);
  EXPECT_ERRNO(ioas->map(src->slice(0, kPageSize), kRW, 0x300000), EFAULT);
  EXPECT_EQ(ioas->counters().mappings, 1U);
  EXPECT_EQ(counters().pinned_bytes, pinned);
  EXPECT_EQ(counters().charged_bytes, charged);
  EXPECT_EQ(process_vmlck_bytes(), pinned);
  EXPECT_ERRNO(d->translate(0x300000, kProtWrite), EFAULT);
  ASSERT_OK(ioas->unmap_all());
  ASSERT_OK(ioas->detach(d));
  munmap(buf, 2 * kPageSize);
}

}  // namespace
}  // namespace iomm
