// P2P pools: reference-counted allocations, no reuse while reachable, IOAS
// use without memlock charges, long-term pin refusal, unbind (during DMA,
// with a holder that does not let go).
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "devmem/uffd.hpp"
#include "devmem_test_support.hpp"
#include "iomm/access.hpp"
#include "iomm/accounting.hpp"
#include "iomm/domain.hpp"
#include "iomm/ioas.hpp"
#include "iomm/memory_monitor.hpp"
#include "iomm/p2p_pool.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

using test::probe_read;
using test::probe_write;

constexpr uint64_t kBlock = 64 * 1024;
constexpr uint32_t kRW = kProtRead | kProtWrite;

#define NEEDS_UFFD() IOMM_NEEDS(devmem::open_minor_uffd().ok(), "userfaultfd minor faults on shmem")

std::shared_ptr<P2pPool> make_pool(uint64_t size) {
  auto pool = P2pPool::create({.name = "pool-test", .size = size});
  EXPECT_TRUE(pool.ok()) << pool.error().describe();
  return pool.ok() ? *pool : nullptr;
}

TEST(DevmemPool, AllocationsAreFirstFitAndReturnAtTheLastReference) {
  auto pool = make_pool(4 * kBlock);
  ASSERT_TRUE(pool);
  EXPECT_ERRNO(pool->allocate(0), EINVAL);
  EXPECT_ERRNO(pool->allocate(100), EINVAL);
  auto a = pool->allocate(2 * kBlock);
  ASSERT_OK(a);
  auto b = pool->allocate(2 * kBlock);
  ASSERT_OK(b);
  EXPECT_EQ((*a)->pool_offset(), 0u);
  EXPECT_EQ((*b)->pool_offset(), 2 * kBlock);
  EXPECT_ERRNO(pool->allocate(kBlock), ENOSPC);
  EXPECT_EQ(pool->counters().allocated_bytes, 4 * kBlock);
  {
    auto held = (*a)->hold("reader");
    ASSERT_OK(held);
    a->reset();  // the handle goes; the hold keeps the block
    EXPECT_ERRNO(pool->allocate(kBlock), ENOSPC);
    EXPECT_EQ(pool->counters().references, 1u);
  }
  EXPECT_EQ(pool->counters().allocated_bytes, 2 * kBlock);
  auto c = pool->allocate(kBlock);
  ASSERT_OK(c);
  EXPECT_EQ((*c)->pool_offset(), 0u);
  b->reset();
  c->reset();
  EXPECT_EQ(pool->counters().allocated_bytes, 0u);
  EXPECT_EQ(pool->counters().allocations, 0u);
  // Freed ranges coalesce: the whole pool fits again.
  EXPECT_OK(pool->allocate(4 * kBlock));
}

TEST(DevmemPool, NoBlockIsReusedWhileMapped) {
  NEEDS_UFFD();
  auto pool = make_pool(kBlock);
  ASSERT_TRUE(pool);
  auto a = pool->allocate(kBlock);
  ASSERT_OK(a);
  auto mapping = DeviceMapping::map((*a)->region(), 0, kBlock);
  ASSERT_OK(mapping);
  std::byte* const old_data = (*mapping)->data();
  std::memcpy(old_data, "secret of A", 12);
  // A mapping nobody registered (a raw mmap of the exported fd).
  void* raw =
      mmap(nullptr, kBlock, PROT_READ | PROT_WRITE, MAP_SHARED, (*a)->region()->exported().fd, 0);
  ASSERT_NE(raw, MAP_FAILED);
  a->reset();
  // The registered mapping still references the block: nothing to hand out.
  EXPECT_ERRNO(pool->allocate(kBlock), ENOSPC);
  EXPECT_EQ(std::memcmp(old_data, "secret of A", 12), 0);
  mapping->reset();
  EXPECT_EQ(pool->counters().allocated_bytes, 0u);

  auto b = pool->allocate(kBlock);
  ASSERT_OK(b);
  EXPECT_EQ((*b)->pool_offset(), 0u);  // the same range of the pool
  auto mapping_b = DeviceMapping::map((*b)->region(), 0, kBlock);
  ASSERT_OK(mapping_b);
  char first[12] = {};
  std::memcpy(first, (*mapping_b)->data(), sizeof first);
  EXPECT_EQ(std::memcmp(first, std::string(12, '\0').data(), 12), 0) << "A's data leaked into B";
  std::memcpy((*mapping_b)->data(), "secret of B", 12);
  // The stale mapping reaches neither A's memory (freed: SIGBUS) nor B's.
  uint64_t v = 0;
  EXPECT_FALSE(probe_read(raw, &v));
  EXPECT_FALSE(probe_write(raw, 1));
  munmap(raw, kBlock);
}

TEST(DevmemPool, IoasUseIsNeverChargedAndNeedsRegistrationToPin) {
  auto pool = make_pool(8 * kBlock);
  ASSERT_TRUE(pool);
  auto a = pool->allocate(8 * kBlock);
  ASSERT_OK(a);
  auto ioas = Ioas::create({.account_mode = AccountMode::per_process});
  ASSERT_OK(ioas);
  auto domain = SoftDomain::create({});
  ASSERT_OK(domain);
  ASSERT_OK((*ioas)->attach(*domain));
  test::WithoutIpcLock charged;
  ASSERT_OK(set_memlock_limit(AccountMode::per_process, 0, 0));

  // Unregistered: the domain's long-term pin is refused.
  auto unregistered = (*a)->unregistered_source();
  ASSERT_OK(unregistered);
  EXPECT_ERRNO((*ioas)->map(*unregistered, kRW), EPERM);
  EXPECT_EQ((*ioas)->counters().mappings, 0u);

  // Registered: pinned for the domain, charged nothing despite a 0 limit.
  auto iova = (*a)->map_into(*ioas, kRW);
  ASSERT_OK(iova);
  EXPECT_EQ(counters().charged_bytes, 0u);
  const char msg[] = "peer DMA";
  ASSERT_OK((*domain)->dma_write(*iova + 4096, msg, sizeof msg));
  char back[sizeof msg] = {};
  ASSERT_OK((*a)->region()->read(4096, back, sizeof back));
  EXPECT_STREQ(back, msg);
  EXPECT_EQ((*a)->holders().size(), 1u);
  EXPECT_ERRNO((*a)->unmap_from(*ioas, *iova + 4096), ENOENT);
  ASSERT_OK((*a)->unmap_from(*ioas, *iova));
  EXPECT_TRUE((*a)->holders().empty());
  EXPECT_EQ(counters().pinned_bytes, 0u);
  ASSERT_OK(set_memlock_limit(AccountMode::per_process, 0, std::nullopt));
}

TEST(DevmemPool, PoolMemoryIsRevokedByUnbindNotWatched) {
  auto pool = make_pool(kBlock);
  ASSERT_TRUE(pool);
  auto a = pool->allocate(kBlock);
  ASSERT_OK(a);
  auto source = (*a)->unregistered_source();
  ASSERT_OK(source);
  EXPECT_ERRNO(MemoryWatch::create(*source), EINVAL);
  auto simulated = MemorySource::simulated(kBlock);
  ASSERT_OK(simulated);
  EXPECT_ERRNO(MemoryWatch::create(*simulated), EINVAL);
}

TEST(DevmemPool, UnbindDuringDmaRevokesEverythingInOrder) {
  NEEDS_UFFD();
  auto pool = make_pool(4 * kBlock);
  ASSERT_TRUE(pool);
  auto a = pool->allocate(4 * kBlock);
  ASSERT_OK(a);
  auto ioas = Ioas::create({});
  ASSERT_OK(ioas);
  auto domain = SoftDomain::create({});
  ASSERT_OK(domain);
  ASSERT_OK((*ioas)->attach(*domain));
  auto iova = (*a)->map_into(*ioas, kRW);
  ASSERT_OK(iova);

  // A mediated device pinning a page of it, unpinning when told.
  std::mutex access_mu;
  std::shared_ptr<Access> access;
  std::atomic<int> notified{0};
  bool pinned = false;
  auto created = Access::create(*ioas, [&](const IovaRange&) {
    std::lock_guard lock(access_mu);
    ++notified;
    if (pinned && access->unpin(*iova, 4096).ok()) pinned = false;
  });
  ASSERT_OK(created);
  {
    std::lock_guard lock(access_mu);
    access = *created;
    ASSERT_OK(access->pin(*iova, 4096, kRW));
    pinned = true;
  }
  auto mapping = DeviceMapping::map((*a)->region(), 0, 4 * kBlock);
  ASSERT_OK(mapping);
  ASSERT_TRUE(probe_write((*mapping)->data(), 7));

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> ok{0}, failed{0}, other{0};
  std::thread dma([&] {
    std::vector<char> buf(8192, 'x');
    while (!stop.load()) {
      Status st = (*domain)->dma_write(*iova + 8192, buf.data(), buf.size());
      if (st.ok()) {
        ++ok;
      } else if (st.code() == EFAULT) {
        ++failed;
      } else {
        ++other;
      }
    }
  });
  while (ok.load() < 100) std::this_thread::yield();
  ASSERT_OK(pool->unbind());
  const uint64_t failed_at_unbind = failed.load();
  while (failed.load() < failed_at_unbind + 10) std::this_thread::yield();
  stop = true;
  dma.join();

  EXPECT_EQ(other.load(), 0u);
  EXPECT_GE(notified.load(), 1);
  EXPECT_FALSE(pinned);
  EXPECT_EQ((*ioas)->counters().mappings, 0u);
  EXPECT_ERRNO((*domain)->dma_write(*iova, "x", 1), EFAULT);
  // The consumer's mapping survives, but reaches nothing.
  uint64_t v = 0;
  EXPECT_FALSE(probe_read((*mapping)->data(), &v));
  EXPECT_ERRNO(pool->allocate(kBlock), ENODEV);
  EXPECT_ERRNO((*a)->hold("late"), ENODEV);
  EXPECT_ERRNO((*a)->map_into(*ioas, kRW), ENODEV);
  const PoolCounters c = pool->counters();
  EXPECT_TRUE(c.unbound);
  EXPECT_EQ(c.allocated_bytes, 0u);
  EXPECT_EQ(c.references, 0u);
  EXPECT_EQ(counters().pinned_bytes, 0u);
  mapping->reset();
}

TEST(DevmemPool, UnbindFailsLoudlyNamingTheHolderAndResumes) {
  auto pool = make_pool(kBlock);
  ASSERT_TRUE(pool);
  auto a = pool->allocate(kBlock);
  ASSERT_OK(a);
  auto held = (*a)->hold("dma engine 7");
  ASSERT_OK(held);
  const Status st = pool->unbind(std::chrono::milliseconds(20));
  EXPECT_ERRNO(st, ETIMEDOUT);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.error().message().find("dma engine 7"), std::string::npos) << st.error().message();
  EXPECT_EQ(pool->counters().allocated_bytes, kBlock);
  // A holder that lets go while unbind waits.
  std::thread releaser([&] { held->release(); });
  EXPECT_OK(pool->unbind(std::chrono::seconds(10)));
  releaser.join();
  EXPECT_EQ(pool->counters().allocated_bytes, 0u);
}

}  // namespace
}  // namespace iomm
