// Type1 dirty bitmaps (issue 7 items 4 and 5): where UNMAP puts each
// mapping's bits, and that no write is lost around DIRTY_PAGES START or an
// UNMAP with GET_DIRTY_BITMAP.
#include <gtest/gtest.h>
#include <linux/vfio.h>
#include <sys/mman.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "iomm/vfio_compat.h"
#include "vfio_test_support.hpp"

namespace {

constexpr uint64_t kPage = 4096;

using iomm::test::vfio::call;
using iomm::test::vfio::map;

int dirty_flag(iomm_vfio_container* c, uint32_t flag) {
  vfio_iommu_type1_dirty_bitmap d{.argsz = sizeof(d), .flags = flag};
  return call(c, VFIO_IOMMU_DIRTY_PAGES, &d);
}

// UNMAP [iova, iova + size) with GET_DIRTY_BITMAP at 4 KiB into bits.
int unmap_bitmap(iomm_vfio_container* c, uint64_t iova, uint64_t size, std::vector<__u64>& bits,
                 uint64_t* unmapped = nullptr) {
  alignas(8) unsigned char buf[sizeof(vfio_iommu_type1_dma_unmap) + sizeof(vfio_bitmap)] = {};
  auto* u = reinterpret_cast<vfio_iommu_type1_dma_unmap*>(buf);
  u->argsz = sizeof(buf);
  u->flags = VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP;
  u->iova = iova;
  u->size = size;
  const vfio_bitmap bm{.pgsize = kPage, .size = bits.size() * 8, .data = bits.data()};
  std::memcpy(u->data, &bm, sizeof(bm));
  const int e = call(c, VFIO_IOMMU_UNMAP_DMA, u);
  if (unmapped != nullptr) *unmapped = u->size;
  return e;
}

int get_bitmap(iomm_vfio_container* c, uint64_t iova, uint64_t size, std::vector<__u64>& bits) {
  alignas(8) unsigned char
      buf[sizeof(vfio_iommu_type1_dirty_bitmap) + sizeof(vfio_iommu_type1_dirty_bitmap_get)] = {};
  auto* hdr = reinterpret_cast<vfio_iommu_type1_dirty_bitmap*>(buf);
  hdr->argsz = sizeof(buf);
  hdr->flags = VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP;
  const vfio_iommu_type1_dirty_bitmap_get get{
      .iova = iova,
      .size = size,
      .bitmap = {.pgsize = kPage, .size = bits.size() * 8, .data = bits.data()}};
  std::memcpy(hdr->data, &get, sizeof(get));
  return call(c, VFIO_IOMMU_DIRTY_PAGES, hdr);
}

struct Anon {
  explicit Anon(size_t n) : size(n) {
    p = static_cast<unsigned char*>(
        mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  }
  ~Anon() { munmap(p, size); }
  unsigned char* p;
  size_t size;
};

// The kernel places each mapping's bits at (dma->iova - iova) >> pgshift in
// a bitmap sized for the requested range: a leading hole of 64 pages puts
// the mapping's bits in the second word.
TEST(VfioDirtyBitmap, UnmapBitsAfterALeadingHole) {
  auto* c = iomm_vfio_open();
  auto* sw = iomm_vfio_group_create_software(c, nullptr);
  ASSERT_EQ(iomm_vfio_ioctl(c, VFIO_SET_IOMMU, reinterpret_cast<void*>(VFIO_TYPE1v2_IOMMU)), 0);
  Anon m(8 * kPage);
  const uint64_t base = 0x1000000;
  ASSERT_EQ(map(c, base + 64 * kPage, m.p, 4 * kPage), 0);
  ASSERT_EQ(map(c, base + 100 * kPage, m.p + 4 * kPage, 4 * kPage), 0);
  ASSERT_EQ(dirty_flag(c, VFIO_IOMMU_DIRTY_PAGES_FLAG_START), 0);
  char byte = 1;
  ASSERT_EQ(iomm_vfio_group_dma_rw(sw, base + 67 * kPage, &byte, 1, 1), 0);
  ASSERT_EQ(iomm_vfio_group_dma_rw(sw, base + 101 * kPage, &byte, 1, 1), 0);
  std::vector<__u64> bits(2, 0);
  uint64_t unmapped = 0;
  ASSERT_EQ(unmap_bitmap(c, base, 128 * kPage, bits, &unmapped), 0);
  EXPECT_EQ(unmapped, 8 * kPage);
  EXPECT_EQ(bits[0], 0U);
  EXPECT_EQ(bits[1], (1ULL << 3) | (1ULL << 37));
  iomm_vfio_group_destroy(sw);
  iomm_vfio_close(c);
}

struct Driver {
  iomm_vfio_group* md = nullptr;
  iomm_vfio_group* sw = nullptr;
  uint64_t pinned = 0;
  uint64_t write_at = 0;
  int writes = 0;
};

// The callback runs between the victims being chosen and the translations
// going away. A device write in that window (here: from the callback) must
// be in the UNMAP's bitmap; the pinned page is reported too.
TEST(VfioDirtyBitmap, WriteDuringTheUnmapIsReported) {
  auto* c = iomm_vfio_open();
  Driver d;
  d.sw = iomm_vfio_group_create_software(c, nullptr);
  d.md = iomm_vfio_group_create_mediated(
      c,
      [](void* opaque, uint64_t iova, uint64_t size) {
        auto* drv = static_cast<Driver*>(opaque);
        if (drv->pinned >= iova && drv->pinned < iova + size) {
          EXPECT_EQ(iomm_vfio_unpin_pages(drv->md, drv->pinned, 1), 1);
        }
        char byte = 2;
        EXPECT_EQ(iomm_vfio_group_dma_rw(drv->sw, drv->write_at, &byte, 1, 1), 0);
        ++drv->writes;
      },
      &d);
  ASSERT_EQ(iomm_vfio_ioctl(c, VFIO_SET_IOMMU, reinterpret_cast<void*>(VFIO_TYPE1v2_IOMMU)), 0);
  Anon m(64 * kPage);
  const uint64_t base = 0x100000;
  ASSERT_EQ(map(c, base, m.p, 64 * kPage), 0);
  ASSERT_EQ(dirty_flag(c, VFIO_IOMMU_DIRTY_PAGES_FLAG_START), 0);
  void* host[1];
  d.pinned = base + 2 * kPage;
  d.write_at = base + 9 * kPage;
  ASSERT_EQ(iomm_vfio_pin_pages(d.md, d.pinned, 1, IOMM_VFIO_PROT_READ, host), 1);
  std::vector<__u64> bits(1, 0);
  ASSERT_EQ(unmap_bitmap(c, base, 64 * kPage, bits), 0);
  EXPECT_EQ(d.writes, 1);
  EXPECT_EQ(bits[0], (1ULL << 9) | (1ULL << 2));
  iomm_vfio_group_destroy(d.md);
  iomm_vfio_group_destroy(d.sw);
  iomm_vfio_close(c);
}

// Reads guest memory that a device may be writing: a race by design (as
// with a real device, the dirty log, not the bytes, says what changed), kept
// out of ThreadSanitizer's view. Volatile reads, so no interceptable memcpy
// is made of the loop.
__attribute__((no_sanitize("thread"))) void copy_racing_device(unsigned char* dst,
                                                               const unsigned char* src, size_t n) {
  const volatile unsigned char* from = src;
  for (size_t i = 0; i < n; ++i) dst[i] = from[i];
}

// Migration's invariant under fire. A device writes continuously (software
// DMA and mediated dma_rw) while tracking is stopped and started and ranges
// are unmapped with GET_DIRTY_BITMAP and mapped again. After each START the
// memory is snapshotted; a page whose content later differs from the
// snapshot must be in the union of the bitmaps reported since.
TEST(VfioDirtyBitmap, NoWrittenPageMissingUnderConcurrentStartAndUnmap) {
  constexpr uint64_t kChunks = 8;
  constexpr uint64_t kChunkPages = 64;
  constexpr uint64_t kPages = kChunks * kChunkPages;
  constexpr uint64_t kBase = 0x4000000;
  const unsigned seed = 0x7e57d1;
  SCOPED_TRACE(seed);
  auto* c = iomm_vfio_open();
  auto* sw = iomm_vfio_group_create_software(c, nullptr);
  auto* md = iomm_vfio_group_create_mediated(
      c, [](void*, uint64_t, uint64_t) {}, nullptr);
  ASSERT_EQ(iomm_vfio_ioctl(c, VFIO_SET_IOMMU, reinterpret_cast<void*>(VFIO_TYPE1v2_IOMMU)), 0);
  Anon mem(kPages * kPage);
  for (uint64_t k = 0; k < kChunks; ++k) {
    ASSERT_EQ(map(c, kBase + k * kChunkPages * kPage, mem.p + k * kChunkPages * kPage,
                  kChunkPages * kPage),
              0);
  }
  std::atomic<bool> stop{false};
  auto writer = [&](unsigned id) {
    std::mt19937_64 rng(seed + id);
    std::vector<unsigned char> buf(16 * kPage);
    uint64_t value = id;
    while (!stop.load(std::memory_order_relaxed)) {
      const uint64_t chunk = rng() % kChunks;
      const uint64_t page = rng() % (kChunkPages - 16);
      const uint64_t pages = 1 + rng() % 16;
      value += 2;
      std::memset(buf.data(), static_cast<int>(value & 0xff) | 1, pages * kPage);
      const uint64_t iova = kBase + (chunk * kChunkPages + page) * kPage;
      // Errors are expected while a chunk is unmapped.
      if (id == 0) {
        (void)iomm_vfio_group_dma_rw(sw, iova, buf.data(), pages * kPage, 1);
      } else {
        (void)iomm_vfio_dma_rw(md, iova, buf.data(), pages * kPage, 1);
      }
    }
  };
  // Joined on every way out, a failed ASSERT included, and before the
  // groups they use are destroyed.
  struct Writers {
    std::atomic<bool>& stop;
    std::thread t0, t1;
    void finish() {
      stop = true;
      if (t0.joinable()) t0.join();
      if (t1.joinable()) t1.join();
    }
    ~Writers() { finish(); }
  } writers{stop, std::thread(writer, 0), std::thread(writer, 1)};
  std::mt19937_64 rng(seed);
  std::vector<unsigned char> snapshot(kPages * kPage);
  std::vector<__u64> seen(kPages / 64);
  std::vector<__u64> bits(kPages / 64);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(1500);
  int cycles = 0;
  int changed_pages = 0;
  while (std::chrono::steady_clock::now() < deadline || cycles < 4) {
    ++cycles;
    ASSERT_EQ(dirty_flag(c, VFIO_IOMMU_DIRTY_PAGES_FLAG_START), 0);
    copy_racing_device(snapshot.data(), mem.p, snapshot.size());
    std::fill(seen.begin(), seen.end(), 0);
    for (int step = 0; step < 4; ++step) {
      const uint64_t chunk = rng() % kChunks;
      const uint64_t iova = kBase + chunk * kChunkPages * kPage;
      std::vector<__u64> chunk_bits(kChunkPages / 64, 0);
      uint64_t unmapped = 0;
      ASSERT_EQ(unmap_bitmap(c, iova, kChunkPages * kPage, chunk_bits, &unmapped), 0);
      ASSERT_EQ(unmapped, kChunkPages * kPage);
      for (uint64_t i = 0; i < kChunkPages / 64; ++i)
        seen[chunk * kChunkPages / 64 + i] |= chunk_bits[i];
      ASSERT_EQ(map(c, iova, mem.p + chunk * kChunkPages * kPage, kChunkPages * kPage), 0);
    }
    std::vector<unsigned char> now(kPages * kPage);
    copy_racing_device(now.data(), mem.p, now.size());
    std::fill(bits.begin(), bits.end(), 0);
    ASSERT_EQ(get_bitmap(c, kBase, kPages * kPage, bits), 0);
    for (uint64_t i = 0; i < bits.size(); ++i) seen[i] |= bits[i];
    for (uint64_t p = 0; p < kPages; ++p) {
      if (std::memcmp(&now[p * kPage], &snapshot[p * kPage], kPage) == 0) continue;
      ++changed_pages;
      ASSERT_NE(seen[p / 64] >> (p % 64) & 1, 0U)
          << "page " << p << " changed after START but is in no bitmap (cycle " << cycles << ")";
    }
    ASSERT_EQ(dirty_flag(c, VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP), 0);
  }
  writers.finish();
  EXPECT_GT(changed_pages, 0);  // the writers did run
  iomm_vfio_group_destroy(md);
  iomm_vfio_group_destroy(sw);
  iomm_vfio_close(c);
}

}  // namespace
