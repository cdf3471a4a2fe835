// Type1 locking and lifetimes (issue 7 items 2 and 3): dma_unmap callbacks
// run with no iomm lock held and may call back into the container, and
// every entry point is safe against group destroy and container close.
#include <gtest/gtest.h>
#include <linux/vfio.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "iomm/accounting.hpp"
#include "iomm/vfio_compat.h"
#include "vfio_test_support.hpp"

namespace {

constexpr uint64_t kPage = 4096;

using iomm::test::vfio::call;
using iomm::test::vfio::map;

int unmap(iomm_vfio_container* c, uint64_t iova, uint64_t size, uint64_t* unmapped = nullptr) {
  return iomm::test::vfio::unmap(c, iova, size, 0, unmapped);
}

// DMA_AVAIL from GET_INFO, or -errno.
int64_t dma_avail(iomm_vfio_container* c) {
  alignas(8) unsigned char buf[512] = {};
  auto* info = reinterpret_cast<vfio_iommu_type1_info*>(buf);
  info->argsz = sizeof(buf);
  if (const int e = call(c, VFIO_IOMMU_GET_INFO, info); e != 0) return -e;
  for (uint32_t off = info->cap_offset; off != 0;) {
    const auto* h = reinterpret_cast<const vfio_info_cap_header*>(buf + off);
    if (h->id == VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL) {
      return reinterpret_cast<const vfio_iommu_type1_info_dma_avail*>(h)->avail;
    }
    off = h->next;
  }
  return -ENOENT;
}

// Kills the test (instead of hanging it) if the body deadlocks.
struct Watchdog {
  explicit Watchdog(unsigned seconds) { alarm(seconds); }
  ~Watchdog() { alarm(0); }
};

struct Reentrant {
  iomm_vfio_container* c = nullptr;
  iomm_vfio_group* md = nullptr;
  const unsigned char* other_va = nullptr;
  uint64_t pinned = 0;
  int calls = 0;
  int64_t avail_inside = 0;
  int map_other = -1;
  int map_over_victim = -1;
  int unmap_victim = -1;
};

// Type1 notifies with its lock dropped; so must we. From inside the
// callback: GET_INFO and MAP_DMA of an unrelated range succeed, the victim
// still counts as mapped (EEXIST, DMA_AVAIL), and unmapping the victim again
// is EDEADLOCK rather than a hang.
TEST(VfioLocking, CallbackCallsBackIntoTheContainer) {
  const Watchdog watchdog(30);
  Reentrant r;
  r.c = iomm_vfio_open();
  r.md = iomm_vfio_group_create_mediated(
      r.c,
      [](void* opaque, uint64_t iova, uint64_t size) {
        auto* s = static_cast<Reentrant*>(opaque);
        ++s->calls;
        s->avail_inside = dma_avail(s->c);
        s->map_other = map(s->c, 0x200000, s->other_va, 4 * kPage);
        s->map_over_victim = map(s->c, iova, s->other_va, kPage);
        s->unmap_victim = unmap(s->c, iova, size);
        EXPECT_EQ(iomm_vfio_unpin_pages(s->md, s->pinned, 1), 1);
      },
      &r);
  ASSERT_EQ(iomm_vfio_ioctl(r.c, VFIO_SET_IOMMU, reinterpret_cast<void*>(VFIO_TYPE1v2_IOMMU)), 0);
  std::vector<unsigned char> mem(16 * kPage);
  auto* va = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(mem.data()) + kPage - 1) & ~(kPage - 1));
  r.other_va = va + 4 * kPage;
  ASSERT_EQ(map(r.c, 0x100000, va, 4 * kPage), 0);
  const int64_t avail = dma_avail(r.c);
  r.pinned = 0x101000;
  void* host[1];
  ASSERT_EQ(iomm_vfio_pin_pages(r.md, r.pinned, 1, IOMM_VFIO_PROT_READ, host), 1);
  uint64_t unmapped = 0;
  ASSERT_EQ(unmap(r.c, 0x100000, 4 * kPage, &unmapped), 0);
  EXPECT_EQ(unmapped, 4 * kPage);
  EXPECT_EQ(r.calls, 1);
  EXPECT_EQ(r.avail_inside, avail);
  EXPECT_EQ(r.map_other, 0);
  EXPECT_EQ(r.map_over_victim, EEXIST);
  EXPECT_EQ(r.unmap_victim, EDEADLOCK);
  EXPECT_EQ(dma_avail(r.c), avail);  // one gone, one added from the callback
  ASSERT_EQ(unmap(r.c, 0x200000, 4 * kPage, &unmapped), 0);
  EXPECT_EQ(unmapped, 4 * kPage);
  iomm_vfio_group_destroy(r.md);
  iomm_vfio_close(r.c);
}

// Two unmaps whose callbacks each unmap the other's victim: waiting would
// never end, so exactly one of them is told EDEADLOCK; the other waits for
// that unmap to finish, starts over and finds its range gone (0 bytes).
TEST(VfioLocking, CallbacksUnmappingEachOthersVictimsDoNotHang) {
  const Watchdog watchdog(30);
  struct Shared {
    iomm_vfio_container* c = nullptr;
    iomm_vfio_group* md = nullptr;
    std::atomic<int> in_callback{0};
    int result[2] = {-1, -1};
    uint64_t size[2] = {1, 1};
  } sh;
  static constexpr uint64_t kIova[2] = {0x100000, 0x200000};
  sh.c = iomm_vfio_open();
  sh.md = iomm_vfio_group_create_mediated(
      sh.c,
      [](void* opaque, uint64_t iova, uint64_t) {
        auto* s = static_cast<Shared*>(opaque);
        const int me = iova == kIova[0] ? 0 : 1;
        EXPECT_EQ(iomm_vfio_unpin_pages(s->md, iova, 1), 1);
        s->in_callback.fetch_add(1);
        while (s->in_callback.load() < 2) std::this_thread::yield();
        if (me == 1) std::this_thread::sleep_for(std::chrono::milliseconds(50));
        s->result[me] = unmap(s->c, kIova[1 - me], 4 * kPage, &s->size[me]);
      },
      &sh);
  ASSERT_EQ(iomm_vfio_ioctl(sh.c, VFIO_SET_IOMMU, reinterpret_cast<void*>(VFIO_TYPE1v2_IOMMU)), 0);
  std::vector<unsigned char> mem(9 * kPage);
  auto* va = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(mem.data()) + kPage - 1) & ~(kPage - 1));
  for (int i = 0; i < 2; ++i) {
    ASSERT_EQ(map(sh.c, kIova[i], va + i * 4 * kPage, 4 * kPage), 0);
    void* host[1];
    ASSERT_EQ(iomm_vfio_pin_pages(sh.md, kIova[i], 1, IOMM_VFIO_PROT_READ, host), 1);
  }
  int outer[2] = {-1, -1};
  std::thread a([&] { outer[0] = unmap(sh.c, kIova[0], 4 * kPage); });
  std::thread b([&] { outer[1] = unmap(sh.c, kIova[1], 4 * kPage); });
  a.join();
  b.join();
  EXPECT_EQ(outer[0], 0);
  EXPECT_EQ(outer[1], 0);
  const int deadlocked = sh.result[0] == EDEADLOCK ? 0 : 1;
  EXPECT_EQ(sh.result[deadlocked], EDEADLOCK);
  EXPECT_EQ(sh.size[deadlocked], 4 * kPage);  // untouched on failure
  EXPECT_EQ(sh.result[1 - deadlocked], 0);
  EXPECT_EQ(sh.size[1 - deadlocked], 0U);  // already gone when it started over
  iomm_vfio_group_destroy(sh.md);
  iomm_vfio_close(sh.c);
}

// A driver that creates and destroys groups while holding its own lock,
// racing unmaps whose callback takes that lock: with the container lock
// held across the callback this is an ABBA deadlock.
TEST(VfioLocking, GroupDestroyUnderDriverLockRacesUnmap) {
  const Watchdog watchdog(60);
  struct Driver {
    std::mutex mu;
    iomm_vfio_group* md = nullptr;
    std::vector<uint64_t> pins;  // mu
  } drv;
  auto* c = iomm_vfio_open();
  drv.md = iomm_vfio_group_create_mediated(
      c,
      [](void* opaque, uint64_t iova, uint64_t size) {
        auto* d = static_cast<Driver*>(opaque);
        std::lock_guard lk(d->mu);
        std::erase_if(d->pins, [&](uint64_t p) {
          if (p < iova || p - iova >= size) return false;
          EXPECT_EQ(iomm_vfio_unpin_pages(d->md, p, 1), 1);
          return true;
        });
      },
      &drv);
  ASSERT_EQ(iomm_vfio_ioctl(c, VFIO_SET_IOMMU, reinterpret_cast<void*>(VFIO_TYPE1v2_IOMMU)), 0);
  std::vector<unsigned char> mem(65 * kPage);
  auto* va = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(mem.data()) + kPage - 1) & ~(kPage - 1));
  std::atomic<bool> stop{false};
  const unsigned seed = 0x10c4;
  SCOPED_TRACE(seed);
  std::thread churn([&] {
    std::mt19937 rng(seed);
    while (!stop.load()) {
      std::lock_guard lk(drv.mu);
      iomm_vfio_group* g = (rng() & 1) != 0 ? iomm_vfio_group_create_software(c, nullptr)
                                            : iomm_vfio_group_create_mediated(
                                                  c, [](void*, uint64_t, uint64_t) {}, nullptr);
      ASSERT_NE(g, nullptr) << errno;
      iomm_vfio_group_destroy(g);
    }
  });
  std::mt19937 rng(seed + 1);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(1000);
  int rounds = 0;
  for (; std::chrono::steady_clock::now() < deadline; ++rounds) {
    const uint64_t slot = rng() % 4;
    const uint64_t iova = 0x100000 + slot * 16 * kPage;
    ASSERT_EQ(map(c, iova, va + slot * 16 * kPage, 16 * kPage), 0);
    {
      std::lock_guard lk(drv.mu);
      const uint64_t page = iova + (rng() % 16) * kPage;
      void* host[1];
      ASSERT_EQ(iomm_vfio_pin_pages(drv.md, page, 1, IOMM_VFIO_PROT_WRITE, host), 1);
      drv.pins.push_back(page);
    }
    uint64_t unmapped = 0;
    ASSERT_EQ(unmap(c, iova, 16 * kPage, &unmapped), 0);
    ASSERT_EQ(unmapped, 16 * kPage);
  }
  stop = true;
  churn.join();
  EXPECT_GT(rounds, 0);
  EXPECT_TRUE(drv.pins.empty());
  iomm_vfio_group_destroy(drv.md);
  iomm_vfio_close(c);
}

// Every entry point against every other: threads map and unmap (ioctl),
// pin, unpin and dma_rw through a mediated group, DMA through a software
// group, and destroy their groups, while the last group goes away or the
// container is closed under them. Nothing may crash, hang, leak a pin or a
// charge, or (under ThreadSanitizer) race.
TEST(VfioLifetime, EntryPointsRaceGroupDestroyAndClose) {
  const Watchdog watchdog(120);
  constexpr uint64_t kSlots = 8;
  constexpr uint64_t kSlotPages = 4;
  const unsigned seed = 0x11fe;
  SCOPED_TRACE(seed);
  std::vector<unsigned char> mem((kSlots * kSlotPages + 1) * kPage);
  auto* va = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(mem.data()) + kPage - 1) & ~(kPage - 1));
  struct Driver {
    std::mutex mu;
    iomm_vfio_group* md = nullptr;
    std::vector<uint64_t> pins;  // mu
  };
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(1500);
  for (int round = 0; round < 6 || std::chrono::steady_clock::now() < deadline; ++round) {
    if (round >= 40) break;
    const bool close_under_groups = (round & 1) != 0;
    Driver drv;
    auto* c = iomm_vfio_open();
    auto* sw = iomm_vfio_group_create_software(c, nullptr);
    drv.md = iomm_vfio_group_create_mediated(
        c,
        [](void* opaque, uint64_t iova, uint64_t size) {
          auto* d = static_cast<Driver*>(opaque);
          std::lock_guard lk(d->mu);
          std::erase_if(d->pins, [&](uint64_t p) {
            if (p < iova || p - iova >= size) return false;
            (void)iomm_vfio_unpin_pages(d->md, p, 1);
            return true;
          });
        },
        &drv);
    ASSERT_NE(sw, nullptr);
    ASSERT_NE(drv.md, nullptr);
    ASSERT_EQ(iomm_vfio_ioctl(c, VFIO_SET_IOMMU, reinterpret_cast<void*>(VFIO_TYPE1v2_IOMMU)), 0);
    auto slot_iova = [](uint64_t s) { return 0x100000 + s * kSlotPages * kPage; };
    std::thread mapper([&, r = round] {
      std::mt19937 rng(seed + r * 4);
      for (int i = 0; i < 400; ++i) {
        const uint64_t s = rng() % kSlots;
        switch (rng() % 4) {
          case 0:
          case 1:
            (void)map(c, slot_iova(s), va + s * kSlotPages * kPage, kSlotPages * kPage);
            break;
          case 2:
            (void)unmap(c, slot_iova(s), kSlotPages * kPage);
            break;
          default:
            (void)dma_avail(c);
            break;
        }
      }
    });
    std::thread pinner([&, r = round] {
      std::mt19937 rng(seed + r * 4 + 1);
      const int destroy_at = close_under_groups ? -1 : static_cast<int>(rng() % 300);
      for (int i = 0; i < 300; ++i) {
        if (i == destroy_at) break;
        const uint64_t page = slot_iova(rng() % kSlots) + (rng() % kSlotPages) * kPage;
        unsigned char byte = 0;
        switch (rng() % 3) {
          case 0: {
            std::lock_guard lk(drv.mu);
            void* host[1];
            if (iomm_vfio_pin_pages(drv.md, page, 1, IOMM_VFIO_PROT_WRITE, host) == 1) {
              drv.pins.push_back(page);
            }
            break;
          }
          case 1: {
            std::lock_guard lk(drv.mu);
            if (!drv.pins.empty()) {
              (void)iomm_vfio_unpin_pages(drv.md, drv.pins.back(), 1);
              drv.pins.pop_back();
            }
            break;
          }
          default:
            (void)iomm_vfio_dma_rw(drv.md, page, &byte, 1, static_cast<int>(rng() & 1));
            break;
        }
      }
      iomm_vfio_group_destroy(drv.md);  // not under drv.mu: its callback takes it
      std::lock_guard lk(drv.mu);
      drv.pins.clear();  // released with the group
    });
    std::thread device([&, r = round] {
      std::mt19937 rng(seed + r * 4 + 2);
      const int destroy_at = close_under_groups ? -1 : static_cast<int>(rng() % 300);
      for (int i = 0; i < 300; ++i) {
        if (i == destroy_at) break;
        unsigned char buf[64] = {};
        (void)iomm_vfio_group_dma_rw(sw, slot_iova(rng() % kSlots) + (rng() % 4000), buf,
                                     sizeof(buf), static_cast<int>(rng() & 1));
      }
      iomm_vfio_group_destroy(sw);
    });
    if (close_under_groups) {
      // The handle's own calls end before its close; group calls may not.
      mapper.join();
      iomm_vfio_close(c);
      pinner.join();
      device.join();
    } else {
      mapper.join();
      pinner.join();
      device.join();
      iomm_vfio_close(c);
    }
    ASSERT_EQ(iomm::counters().charged_bytes, 0U) << "round " << round;
  }
}

}  // namespace
