// On-demand (unpinned) mappings: nothing pinned, charged or locked; domains
// translate while the memory is there; a source invalidation drops the
// translations, DMA then faults cleanly, and translates again once the
// memory is back.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "iomm/access.hpp"
#include "iomm/accounting.hpp"
#include "iomm/domain.hpp"
#include "iomm/ioas.hpp"
#include "mem/mem_object.hpp"
#include "notify/invalidate.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

constexpr uint32_t kRW = kProtRead | kProtWrite;
constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kIova = 0x400000;
using test::Memfd;

struct OnDemandMap : testing::Test {
  // A file that may shrink: the tests truncate it under the mapping.
  Memfd mfd{2 * kMiB, 0, test::Shrink::allowed};
  std::shared_ptr<Ioas> ioas = Ioas::create({}).value();
  std::shared_ptr<SoftDomain> domain = SoftDomain::create({}).value();
  MemorySource src = MemorySource::from_file(mfd.fd(), 0, 2 * kMiB, FileSeal::allow_shrink).value();

  void expect_nothing_held(uint64_t vmlck_before) {
    const Counters c = counters();
    EXPECT_EQ(c.pinned_bytes, 0U);
    EXPECT_EQ(c.charged_bytes, 0U);
    EXPECT_EQ(c.vmlck_bytes, vmlck_before);
  }
};

TEST_F(OnDemandMap, NothingIsPinnedChargedOrLockedAndDmaWorks) {
  const uint64_t vmlck = counters().vmlck_bytes;
  ASSERT_OK(ioas->attach(domain));
  ASSERT_OK(ioas->map_on_demand(src, kRW, kIova));
  expect_nothing_held(vmlck);
  ASSERT_EQ(ioas->mappings().size(), 1U);
  EXPECT_FALSE(ioas->mappings()[0].pinned);
  EXPECT_EQ(domain->counters().mapped_bytes, 2 * kMiB);  // filled at map: memory present
  const char msg[] = "on demand";
  ASSERT_OK(domain->dma_write(kIova + 100, msg, sizeof(msg)));
  char back[sizeof(msg)] = {};
  ASSERT_OK(domain->dma_read(kIova + 100, back, sizeof(back)));
  EXPECT_STREQ(back, msg);
  EXPECT_EQ(std::memcmp(static_cast<char*>(src.host_address()) + 100, msg, sizeof(msg)), 0);
  expect_nothing_held(vmlck);
  ASSERT_OK(ioas->unmap(kIova, 2 * kMiB));
  EXPECT_EQ(domain->counters().mapped_bytes, 0U);
  EXPECT_TRUE(src.object()->notifiers().empty());
  expect_nothing_held(vmlck);
}

TEST_F(OnDemandMap, AttachFillsWithoutPinning) {
  const uint64_t vmlck = counters().vmlck_bytes;
  ASSERT_OK(ioas->map_on_demand(src, kRW, kIova));
  ASSERT_OK(ioas->attach(domain));
  EXPECT_EQ(domain->counters().mapped_bytes, 2 * kMiB);
  expect_nothing_held(vmlck);
  // A second domain gets the translations of the filled area too.
  auto second = SoftDomain::create({}).value();
  ASSERT_OK(ioas->attach(second));
  EXPECT_EQ(second->counters().mapped_bytes, 2 * kMiB);
  ASSERT_OK(ioas->detach(second));
  ASSERT_OK(ioas->detach(domain));
  expect_nothing_held(vmlck);
}

TEST_F(OnDemandMap, TruncationDropsTranslationsAndTheyComeBackWithTheMemory) {
  ASSERT_OK(ioas->attach(domain));
  ASSERT_OK(ioas->map_on_demand(src, kRW, kIova));
  char byte = 1;
  ASSERT_OK(domain->dma_write(kIova + kMiB, &byte, 1));
  ASSERT_EQ(ftruncate(mfd.fd(), 0), 0);
  // What the truncation monitor reports for the file.
  notify::invalidate_source(*src.object(), {0, 2 * kMiB - 1}, InvalidationCause::truncate);
  EXPECT_EQ(domain->counters().mapped_bytes, 0U);
  domain->take_faults();
  EXPECT_ERRNO(domain->dma_read(kIova + kMiB, &byte, 1), EFAULT);
  auto faults = domain->take_faults();
  ASSERT_EQ(faults.size(), 1U);
  EXPECT_EQ(faults[0].reason, FaultReason::not_present);
  EXPECT_EQ(faults[0].iova, kIova + kMiB);
  // Memory back: the miss fills the mapping again and the DMA goes through.
  ASSERT_EQ(ftruncate(mfd.fd(), 2 * kMiB), 0);
  byte = 1;
  ASSERT_OK(domain->dma_read(kIova + kMiB, &byte, 1));
  EXPECT_EQ(byte, 0);  // the truncation discarded what was written
  EXPECT_TRUE(domain->take_faults().empty());
  EXPECT_EQ(domain->counters().mapped_bytes, 2 * kMiB);
  // translate() resolves a miss the same way.
  notify::invalidate_source(*src.object(), {0, 0}, InvalidationCause::discard);
  EXPECT_EQ(domain->counters().mapped_bytes, 0U);
  ASSERT_OK(domain->translate(kIova, kProtRead));
  EXPECT_EQ(domain->counters().mapped_bytes, 2 * kMiB);
}

TEST_F(OnDemandMap, UnrelatedEventsLeaveTheTranslations) {
  Memfd big(4 * kMiB);
  auto low = MemorySource::from_file(big.fd(), 0, 2 * kMiB).value();
  ASSERT_OK(ioas->attach(domain));
  ASSERT_OK(ioas->map_on_demand(low, kRW, kIova));
  notify::invalidate_source(*low.object(), {2 * kMiB, 4 * kMiB - 1}, InvalidationCause::truncate);
  EXPECT_EQ(domain->counters().mapped_bytes, 2 * kMiB);
}

TEST_F(OnDemandMap, UserMemoryUnmappedFaultsAndMappedAgainWorks) {
  constexpr uint64_t kLen = 64 * 1024;
  void* addr = mmap(nullptr, kLen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(addr, MAP_FAILED);
  auto user = MemorySource::from_user(addr, kLen).value();
  const uint64_t vmlck = counters().vmlck_bytes;
  ASSERT_OK(ioas->attach(domain));
  ASSERT_OK(ioas->map_on_demand(user, kRW, kIova));
  expect_nothing_held(vmlck);
  const uint32_t word = 0xfeedf00d;
  ASSERT_OK(domain->dma_write(kIova + 8, &word, sizeof(word)));
  EXPECT_EQ(std::memcmp(static_cast<char*>(addr) + 8, &word, sizeof(word)), 0);

  ASSERT_EQ(munmap(addr, kLen), 0);
  // What the userfaultfd monitor reports for the unmapped range.
  const auto range =
      IovaRange{reinterpret_cast<uint64_t>(addr), reinterpret_cast<uint64_t>(addr) + kLen - 1};
  notify::invalidate_source(*user.object(), range, InvalidationCause::munmap);
  domain->take_faults();
  uint32_t read = 0;
  EXPECT_ERRNO(domain->dma_read(kIova + 8, &read, sizeof(read)), EFAULT);
  auto faults = domain->take_faults();
  ASSERT_EQ(faults.size(), 1U);
  EXPECT_EQ(faults[0].reason, FaultReason::not_present);

  void* again = mmap(addr, kLen, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
  ASSERT_EQ(again, addr);
  ASSERT_OK(domain->dma_read(kIova + 8, &read, sizeof(read)));
  EXPECT_EQ(read, 0U);  // fresh memory
  ASSERT_OK(domain->dma_write(kIova + 8, &word, sizeof(word)));
  EXPECT_EQ(std::memcmp(static_cast<char*>(addr) + 8, &word, sizeof(word)), 0);
  ASSERT_OK(ioas->unmap(kIova, kLen));
  expect_nothing_held(vmlck);
  ASSERT_EQ(munmap(addr, kLen), 0);
}

TEST_F(OnDemandMap, AccessesReadAndWriteButCannotPin) {
  ASSERT_OK(ioas->map_on_demand(src, kRW, kIova));
  auto access = Access::create(ioas, [](const IovaRange&) {}).value();
  EXPECT_ERRNO(access->pin(kIova, kPageSize, kProtRead), EINVAL);
  void* host = nullptr;
  EXPECT_ERRNO(access->pin_pages(kIova, 1, kProtRead, &host), EINVAL);
  EXPECT_EQ(access->pin_count(), 0U);
  EXPECT_EQ(access->page_pinned_count(), 0U);
  const char msg[] = "guarded";
  ASSERT_OK(access->write(kIova + 4096, msg, sizeof(msg)));
  char back[sizeof(msg)] = {};
  ASSERT_OK(access->read(kIova + 4096, back, sizeof(back)));
  EXPECT_STREQ(back, msg);
  // A truncated file: the guarded copy reports EFAULT, never a crash.
  ASSERT_EQ(ftruncate(mfd.fd(), 0), 0);
  EXPECT_ERRNO(access->read(kIova + 4096, back, sizeof(back)), EFAULT);
  EXPECT_EQ(counters().pinned_bytes, 0U);
}

TEST_F(OnDemandMap, CopyStaysOnDemandAndUncharged) {
  const uint64_t vmlck = counters().vmlck_bytes;
  ASSERT_OK(ioas->map_on_demand(src, kRW, kIova));
  auto dst = Ioas::create({}).value();
  auto other = SoftDomain::create({}).value();
  ASSERT_OK(dst->attach(other));
  ASSERT_OK(dst->copy_from(*ioas, kIova, kMiB, kRW, 0x10000000));
  expect_nothing_held(vmlck);
  EXPECT_EQ(other->counters().mapped_bytes, kMiB);
  // The copy follows the source too.
  notify::invalidate_source(*src.object(), {0, 0}, InvalidationCause::discard);
  EXPECT_EQ(other->counters().mapped_bytes, 0U);
}

TEST_F(OnDemandMap, LiveUpdateCannotReplaceIt) {
  ASSERT_OK(ioas->map_on_demand(src, kRW, kIova));
  ASSERT_OK(ioas->invalidate_host(kIova, 2 * kMiB));
  EXPECT_ERRNO(ioas->replace_host(kIova, src, {}), EINVAL);
}

TEST_F(OnDemandMap, MapErrorsAsMap) {
  EXPECT_ERRNO(ioas->map_on_demand(src, 0, kIova), EINVAL);
  EXPECT_ERRNO(ioas->map_on_demand(src.read_only(), kRW, kIova), EPERM);
  ASSERT_OK(ioas->map_on_demand(src, kRW, kIova));
  EXPECT_ERRNO(ioas->map_on_demand(src, kRW, kIova), EEXIST);
  EXPECT_ERRNO(ioas->map_on_demand(src, kRW, UINT64_MAX), EOVERFLOW);
}

}  // namespace
}  // namespace iomm
