// The VFIO type1 layer: ioctl rules and errnos (reference §1.2-§1.8).
#include "iomm/vfio_compat.h"

#include <gtest/gtest.h>
#include <linux/vfio.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "iomm/accounting.hpp"
#include "test_support.hpp"

namespace {

constexpr uint64_t kPage = 4096;

struct Mem {
  explicit Mem(size_t n, int flags = MAP_PRIVATE | MAP_ANONYMOUS, int fd = -1, off_t off = 0)
      : size(n) {
    p = mmap(nullptr, n, PROT_READ | PROT_WRITE, flags, fd, off);
  }
  ~Mem() { munmap(p, size); }
  void* p;
  size_t size;
  uint64_t va() const { return reinterpret_cast<uint64_t>(p); }
};

long ioctl_errno(iomm_vfio_container* c, unsigned long req, void* arg) {
  errno = 0;
  const long r = iomm_vfio_ioctl(c, req, arg);
  return r == -1 ? errno : (r == 0 ? 0 : -r);
}

int map(iomm_vfio_container* c, uint64_t iova, uint64_t vaddr, uint64_t size,
        uint32_t flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE) {
  vfio_iommu_type1_dma_map m{
      .argsz = sizeof(m), .flags = flags, .vaddr = vaddr, .iova = iova, .size = size};
  return static_cast<int>(ioctl_errno(c, VFIO_IOMMU_MAP_DMA, &m));
}

int unmap(iomm_vfio_container* c, uint64_t iova, uint64_t size, uint32_t flags = 0,
          uint64_t* out = nullptr) {
  vfio_iommu_type1_dma_unmap u{.argsz = sizeof(u), .flags = flags, .iova = iova, .size = size};
  const int e = static_cast<int>(ioctl_errno(c, VFIO_IOMMU_UNMAP_DMA, &u));
  if (out != nullptr) *out = u.size;
  return e;
}

struct Fixture {
  explicit Fixture(unsigned long type = VFIO_TYPE1v2_IOMMU, bool sw = true) {
    c = iomm_vfio_open();
    if (sw)
      group = iomm_vfio_group_create_software(c, nullptr);
    else
      group = iomm_vfio_group_create_mediated(
          c, [](void*, uint64_t, uint64_t) {}, nullptr);
    EXPECT_EQ(iomm_vfio_ioctl(c, VFIO_SET_IOMMU, reinterpret_cast<void*>(type)), 0);
  }
  ~Fixture() {
    iomm_vfio_group_destroy(group);
    iomm_vfio_close(c);
  }
  iomm_vfio_container* c;
  iomm_vfio_group* group;
};

TEST(VfioContainer, SetIommuRules) {
  auto* c = iomm_vfio_open();
  EXPECT_EQ(iomm_vfio_ioctl(c, VFIO_GET_API_VERSION, nullptr), VFIO_API_VERSION);
  EXPECT_EQ(iomm_vfio_ioctl(c, VFIO_CHECK_EXTENSION, (void*)VFIO_TYPE1_IOMMU), 1);
  EXPECT_EQ(iomm_vfio_ioctl(c, VFIO_CHECK_EXTENSION, (void*)VFIO_UNMAP_ALL), 1);
  EXPECT_EQ(iomm_vfio_ioctl(c, VFIO_CHECK_EXTENSION, (void*)VFIO_UPDATE_VADDR), 0);
  EXPECT_EQ(iomm_vfio_ioctl(c, VFIO_CHECK_EXTENSION, (void*)VFIO_SPAPR_TCE_IOMMU), 0);
  // No group yet.
  EXPECT_EQ(ioctl_errno(c, VFIO_SET_IOMMU, (void*)VFIO_TYPE1v2_IOMMU), EINVAL);
  vfio_iommu_type1_info info{.argsz = sizeof(info)};
  EXPECT_EQ(ioctl_errno(c, VFIO_IOMMU_GET_INFO, &info), EINVAL);
  auto* g = iomm_vfio_group_create_software(c, nullptr);
  ASSERT_NE(g, nullptr);
  EXPECT_EQ(ioctl_errno(c, VFIO_SET_IOMMU, (void*)VFIO_SPAPR_TCE_IOMMU), ENODEV);
  EXPECT_EQ(ioctl_errno(c, VFIO_SET_IOMMU, (void*)VFIO_TYPE1v2_IOMMU), 0);
  EXPECT_EQ(ioctl_errno(c, VFIO_SET_IOMMU, (void*)VFIO_TYPE1v2_IOMMU), EINVAL);
  EXPECT_EQ(iomm_vfio_ioctl(c, VFIO_CHECK_EXTENSION, (void*)VFIO_UPDATE_VADDR), 1);
  EXPECT_EQ(ioctl_errno(c, 0x3b99, nullptr), ENOTTY);
  iomm_vfio_group_destroy(g);
  // The last group gone, the container is unset again.
  EXPECT_EQ(ioctl_errno(c, VFIO_IOMMU_GET_INFO, &info), EINVAL);
  iomm_vfio_close(c);
}

TEST(VfioContainer, MapChecksInType1Order) {
  Fixture f;
  Mem m(16 * kPage);
  vfio_iommu_type1_dma_map bad{.argsz = 8, .flags = VFIO_DMA_MAP_FLAG_READ};
  EXPECT_EQ(ioctl_errno(f.c, VFIO_IOMMU_MAP_DMA, &bad), EINVAL);  // argsz
  EXPECT_EQ(map(f.c, 0x10000, m.va(), kPage, 1U << 7), EINVAL);   // flags
  EXPECT_EQ(map(f.c, 0x10000, m.va(), kPage, 0), EINVAL);         // no R/W
  EXPECT_EQ(map(f.c, 0x10000, m.va(), kPage, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_VADDR),
            EINVAL);
  EXPECT_EQ(map(f.c, 0x10000, m.va(), 0), EINVAL);
  EXPECT_EQ(map(f.c, 0x10001, m.va(), kPage), EINVAL);
  EXPECT_EQ(map(f.c, 0x10000, m.va() + 1, kPage), EINVAL);
  EXPECT_EQ(map(f.c, UINT64_MAX - kPage + 1, m.va(), 2 * kPage), EINVAL);  // wrap
  EXPECT_EQ(map(f.c, 0x10000, m.va(), 4 * kPage), 0);
  EXPECT_EQ(map(f.c, 0x12000, m.va(), 4 * kPage), EEXIST);
  // Outside the 48-bit aperture: not in a valid IOVA range.
  EXPECT_EQ(map(f.c, 1ULL << 50, m.va(), kPage), EINVAL);
  EXPECT_EQ(map(f.c, 0, 0, 0, VFIO_DMA_MAP_FLAG_VADDR), EINVAL);
  EXPECT_EQ(map(f.c, 0x80000, m.va(), kPage, VFIO_DMA_MAP_FLAG_VADDR), ENOENT);
  EXPECT_EQ(map(f.c, 0x10000, m.va(), 4 * kPage, VFIO_DMA_MAP_FLAG_VADDR), EINVAL);  // valid
  EXPECT_EQ(unmap(f.c, 0, 0, VFIO_DMA_UNMAP_FLAG_ALL), 0);
}

TEST(VfioContainer, DmaAvailAndEnospc) {
  auto* c = iomm_vfio_open();
  auto* g = iomm_vfio_group_create_software(c, nullptr);
  ASSERT_EQ(iomm_vfio_set_dma_entry_limit(c, 2), 0);
  ASSERT_EQ(iomm_vfio_ioctl(c, VFIO_SET_IOMMU, (void*)VFIO_TYPE1v2_IOMMU), 0);
  EXPECT_EQ(iomm_vfio_set_dma_entry_limit(c, 3), -1);
  EXPECT_EQ(errno, EBUSY);
  Mem m(4 * kPage);
  EXPECT_EQ(map(c, 0x10000, m.va(), kPage), 0);
  EXPECT_EQ(map(c, 0x20000, m.va() + kPage, kPage), 0);
  EXPECT_EQ(map(c, 0x10000, m.va(), kPage), EEXIST);  // overlap before the limit
  EXPECT_EQ(map(c, 0x30000, m.va() + 2 * kPage, kPage), ENOSPC);
  alignas(8) unsigned char buf[512] = {};
  auto* info = reinterpret_cast<vfio_iommu_type1_info*>(buf);
  info->argsz = sizeof(buf);
  ASSERT_EQ(iomm_vfio_ioctl(c, VFIO_IOMMU_GET_INFO, info), 0);
  ASSERT_NE(info->flags & VFIO_IOMMU_INFO_CAPS, 0U);
  bool saw_avail = false;
  for (uint32_t off = info->cap_offset; off != 0;) {
    auto* h = reinterpret_cast<vfio_info_cap_header*>(buf + off);
    if (h->id == VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL) {
      EXPECT_EQ(reinterpret_cast<vfio_iommu_type1_info_dma_avail*>(h)->avail, 0U);
      saw_avail = true;
    }
    off = h->next;
  }
  EXPECT_TRUE(saw_avail);
  iomm_vfio_group_destroy(g);
  iomm_vfio_close(c);
}

TEST(VfioContainer, GetInfoShortArgszNeverOverwrites) {
  Fixture f;
  size_t full = 0;
  {
    vfio_iommu_type1_info info{.argsz = sizeof(info)};
    ASSERT_EQ(iomm_vfio_ioctl(f.c, VFIO_IOMMU_GET_INFO, &info), 0);
    full = info.argsz;
    EXPECT_GT(full, sizeof(info));
    EXPECT_EQ(info.cap_offset, 0U);
  }
  for (size_t len = 0; len <= full + 16; ++len) {
    std::vector<unsigned char> buf(full + 64, 0xa5);
    auto* info = reinterpret_cast<vfio_iommu_type1_info*>(buf.data());
    info->argsz = static_cast<uint32_t>(len);
    const long r = iomm_vfio_ioctl(f.c, VFIO_IOMMU_GET_INFO, info);
    if (len < 16) {
      EXPECT_EQ(r, -1);
      EXPECT_EQ(errno, EINVAL);
      continue;
    }
    ASSERT_EQ(r, 0) << len;
    for (size_t i = std::min<size_t>(len, 24); i < buf.size(); ++i) {
      if (len < full) {
        ASSERT_EQ(buf[i], 0xa5) << "byte " << i << " written at argsz " << len;
      }
    }
    if (len >= 20) {
      // Either the whole, valid chain or none.
      if (len >= full) {
        ASSERT_EQ(info->cap_offset, sizeof(vfio_iommu_type1_info));
        int n = 0;
        for (uint32_t off = info->cap_offset; off != 0; ++n) {
          ASSERT_LT(off + sizeof(vfio_info_cap_header), len);
          off = reinterpret_cast<vfio_info_cap_header*>(buf.data() + off)->next;
        }
        EXPECT_EQ(n, 3);  // migration, dma_avail, iova_range
      } else {
        EXPECT_EQ(info->cap_offset, 0U);
        EXPECT_EQ(info->argsz, full);
      }
    }
  }
}

TEST(VfioContainer, UnmapV2Rules) {
  Fixture f;
  Mem m(16 * kPage);
  ASSERT_EQ(map(f.c, 0x10000, m.va(), 4 * kPage), 0);
  ASSERT_EQ(map(f.c, 0x20000, m.va() + 4 * kPage, 4 * kPage), 0);
  uint64_t n = 0;
  EXPECT_EQ(unmap(f.c, 0x11000, kPage), EINVAL);  // bisects start
  EXPECT_EQ(unmap(f.c, 0x10000, kPage), EINVAL);  // bisects end
  EXPECT_EQ(unmap(f.c, 0x10001, kPage), EINVAL);  // misaligned
  EXPECT_EQ(unmap(f.c, 0x10000, 0), EINVAL);      // zero size
  EXPECT_EQ(unmap(f.c, 0x10000, kPage, VFIO_DMA_UNMAP_FLAG_ALL), EINVAL);
  EXPECT_EQ(unmap(f.c, 0, 0, 1U << 5), EINVAL);
  EXPECT_EQ(unmap(f.c, 0x40000, kPage, 0, &n), 0);  // empty: success, 0 bytes
  EXPECT_EQ(n, 0U);
  EXPECT_EQ(unmap(f.c, 0, 0x100000, 0, &n), 0);  // several whole mappings
  EXPECT_EQ(n, 8 * kPage);
}

TEST(VfioContainer, UnmapV1Rules) {
  Fixture f(VFIO_TYPE1_IOMMU);
  Mem m(16 * kPage);
  ASSERT_EQ(map(f.c, 0x10000, m.va(), 4 * kPage), 0);
  uint64_t n = 1;
  EXPECT_EQ(unmap(f.c, 0x11000, kPage, 0, &n), 0);  // starts inside: nothing
  EXPECT_EQ(n, 0U);
  EXPECT_EQ(unmap(f.c, 0x10000, kPage, 0, &n), 0);  // covers the start: all of it
  EXPECT_EQ(n, 4 * kPage);
  // DIRTY_PAGES needs v2.
  vfio_iommu_type1_dirty_bitmap d{.argsz = sizeof(d), .flags = VFIO_IOMMU_DIRTY_PAGES_FLAG_START};
  EXPECT_EQ(ioctl_errno(f.c, VFIO_IOMMU_DIRTY_PAGES, &d), EACCES);
}

int g_unmaps = 0;
iomm_vfio_group* g_mdev = nullptr;
std::vector<uint64_t> g_pinned;

void unpin_cb(void*, uint64_t iova, uint64_t size) {
  ++g_unmaps;
  for (auto it = g_pinned.begin(); it != g_pinned.end();) {
    if (*it >= iova && *it < iova + size) {
      EXPECT_EQ(iomm_vfio_unpin_pages(g_mdev, *it, 1), 1);
      it = g_pinned.erase(it);
    } else {
      ++it;
    }
  }
}

TEST(VfioMediated, PinRulesAndErrnos) {
  auto* c = iomm_vfio_open();
  errno = 0;
  EXPECT_EQ(iomm_vfio_group_create_mediated(c, nullptr, nullptr), nullptr);
  EXPECT_EQ(errno, EINVAL);
  g_mdev = iomm_vfio_group_create_mediated(c, unpin_cb, nullptr);
  ASSERT_NE(g_mdev, nullptr);
  ASSERT_EQ(iomm_vfio_ioctl(c, VFIO_SET_IOMMU, (void*)VFIO_TYPE1v2_IOMMU), 0);
  EXPECT_EQ(iomm_vfio_ioctl(c, VFIO_CHECK_EXTENSION, (void*)VFIO_UPDATE_VADDR), 0);
  Mem m(1024 * kPage);
  ASSERT_EQ(map(c, 0x100000, m.va(), 1024 * kPage, VFIO_DMA_MAP_FLAG_READ), 0);
  std::vector<void*> host(1024);
  EXPECT_EQ(iomm_vfio_pin_pages(g_mdev, 0x100000, 513, IOMM_VFIO_PROT_READ, host.data()), -1);
  EXPECT_EQ(errno, E2BIG);
  EXPECT_EQ(iomm_vfio_pin_pages(g_mdev, 0x100000, 1, IOMM_VFIO_PROT_WRITE, host.data()), -1);
  EXPECT_EQ(errno, EPERM);
  EXPECT_EQ(iomm_vfio_pin_pages(g_mdev, 0x900000, 1, IOMM_VFIO_PROT_READ, host.data()), -1);
  EXPECT_EQ(errno, EINVAL);
  EXPECT_EQ(iomm_vfio_pin_pages(g_mdev, 0x100000, 1, IOMM_VFIO_PROT_READ, nullptr), -1);
  EXPECT_EQ(errno, EINVAL);
  // Pins are charged on demand in a mediated-only container.
  {
    iomm::test::WithoutIpcLock no_cap;
    EXPECT_EQ(unmap(c, 0, 0, VFIO_DMA_UNMAP_FLAG_ALL), 0);
    ASSERT_EQ(map(c, 0x100000, m.va(), 1024 * kPage, VFIO_DMA_MAP_FLAG_READ), 0);
  }
  EXPECT_EQ(iomm::counters().charged_bytes, 0U);
  ASSERT_EQ(iomm_vfio_pin_pages(g_mdev, 0x100000, 512, IOMM_VFIO_PROT_READ, host.data()), 512);
  EXPECT_EQ(host[3], static_cast<char*>(m.p) + 3 * kPage);
  ASSERT_EQ(iomm_vfio_pin_pages(g_mdev, 0x100000, 2, IOMM_VFIO_PROT_READ, host.data()), 2);
  EXPECT_EQ(iomm::counters().charged_bytes, 512 * kPage);
  // Unpin 510 pages; pages 0 and 1 stay (count 2 -> 1).
  ASSERT_EQ(iomm_vfio_unpin_pages(g_mdev, 0x100000, 512), 512);
  EXPECT_EQ(iomm::counters().charged_bytes, 2 * kPage);
  EXPECT_EQ(iomm_vfio_unpin_pages(g_mdev, 0x100000, 3), -1);  // page 2 not pinned
  EXPECT_EQ(errno, EINVAL);
  g_pinned = {0x100000, 0x101000};
  uint64_t n = 0;
  EXPECT_EQ(unmap(c, 0, 0, VFIO_DMA_UNMAP_FLAG_ALL, &n), 0);
  EXPECT_EQ(n, 1024 * kPage);
  EXPECT_EQ(g_unmaps, 1);
  EXPECT_TRUE(g_pinned.empty());
  // VADDR with a mediated group: EBUSY.
  ASSERT_EQ(map(c, 0x100000, m.va(), kPage, VFIO_DMA_MAP_FLAG_READ), 0);
  EXPECT_EQ(unmap(c, 0x100000, kPage, VFIO_DMA_UNMAP_FLAG_VADDR), EBUSY);
  iomm_vfio_group_destroy(g_mdev);
  iomm_vfio_close(c);
}

TEST(VfioMediated, NotV2IsEacces) {
  Fixture f(VFIO_TYPE1_IOMMU, false);
  Mem m(kPage);
  ASSERT_EQ(map(f.c, 0x100000, m.va(), kPage), 0);
  void* host = nullptr;
  EXPECT_EQ(iomm_vfio_pin_pages(f.group, 0x100000, 1, IOMM_VFIO_PROT_READ, &host), -1);
  EXPECT_EQ(errno, EACCES);
}

TEST(VfioMediated, NotChargedTwiceWithSoftwareDomain) {
  iomm::test::WithoutIpcLock no_cap;
  auto* c = iomm_vfio_open();
  auto* sw = iomm_vfio_group_create_software(c, nullptr);
  g_mdev = iomm_vfio_group_create_mediated(c, unpin_cb, nullptr);
  ASSERT_EQ(iomm_vfio_ioctl(c, VFIO_SET_IOMMU, (void*)VFIO_TYPE1v2_IOMMU), 0);
  Mem m(64 * kPage);
  ASSERT_EQ(map(c, 0x100000, m.va(), 64 * kPage), 0);
  EXPECT_EQ(iomm::counters().charged_bytes, 64 * kPage);
  std::vector<void*> host(8);
  ASSERT_EQ(iomm_vfio_pin_pages(g_mdev, 0x100000, 8, IOMM_VFIO_PROT_WRITE, host.data()), 8);
  EXPECT_EQ(iomm::counters().charged_bytes, 64 * kPage);
  // The software domain leaves: only the mediated pins stay charged.
  iomm_vfio_group_destroy(sw);
  EXPECT_EQ(iomm::counters().charged_bytes, 8 * kPage);
  ASSERT_EQ(iomm_vfio_unpin_pages(g_mdev, 0x100000, 8), 8);
  EXPECT_EQ(iomm::counters().charged_bytes, 0U);
  iomm_vfio_group_destroy(g_mdev);
  iomm_vfio_close(c);
}

TEST(VfioGroups, AttachReplaysAllOrNothing) {
  auto* c = iomm_vfio_open();
  auto* sw = iomm_vfio_group_create_software(c, nullptr);
  ASSERT_EQ(iomm_vfio_ioctl(c, VFIO_SET_IOMMU, (void*)VFIO_TYPE1v2_IOMMU), 0);
  Mem m(4 * kPage);
  ASSERT_EQ(map(c, 0x100000, m.va(), 4 * kPage), 0);
  // Aperture excludes the mapping: EINVAL, nothing attached.
  iomm_vfio_sw_group_config cfg{.aperture_start = 0x200000, .aperture_last = 0xffffffff};
  errno = 0;
  EXPECT_EQ(iomm_vfio_group_create_software(c, &cfg), nullptr);
  EXPECT_EQ(errno, EINVAL);
  // Reserved region over the mapping: EINVAL.
  iomm_vfio_reserved_range r{0x101000, 0x101fff};
  iomm_vfio_sw_group_config cfg2{.reserved = &r, .nr_reserved = 1};
  EXPECT_EQ(iomm_vfio_group_create_software(c, &cfg2), nullptr);
  EXPECT_EQ(errno, EINVAL);
  // A compatible one replays the mapping.
  iomm_vfio_sw_group_config cfg3{.pgsize_bitmap = kPage | (1ULL << 21)};
  auto* sw2 = iomm_vfio_group_create_software(c, &cfg3);
  ASSERT_NE(sw2, nullptr);
  char byte = 7;
  EXPECT_EQ(iomm_vfio_group_dma_rw(sw2, 0x100000, &byte, 1, 1), 0);
  EXPECT_EQ(static_cast<char*>(m.p)[0], 7);
  vfio_iommu_type1_info info{.argsz = sizeof(info)};
  ASSERT_EQ(iomm_vfio_ioctl(c, VFIO_IOMMU_GET_INFO, &info), 0);
  EXPECT_EQ(info.iova_pgsizes, kPage | (1ULL << 21));
  iomm_vfio_group_destroy(sw2);
  iomm_vfio_group_destroy(sw);
  iomm_vfio_close(c);
}

TEST(VfioDirty, BitmapRules) {
  Fixture f;
  Mem m(64 * kPage);
  ASSERT_EQ(map(f.c, 0x100000, m.va(), 64 * kPage), 0);
  uint64_t bits[2] = {};
  alignas(8) unsigned char
      buf[sizeof(vfio_iommu_type1_dirty_bitmap) + sizeof(vfio_iommu_type1_dirty_bitmap_get)] = {};
  auto* hdr = reinterpret_cast<vfio_iommu_type1_dirty_bitmap*>(buf);
  auto* get = reinterpret_cast<vfio_iommu_type1_dirty_bitmap_get*>(hdr->data);
  auto query = [&](uint64_t iova, uint64_t size, uint64_t pgsize) {
    hdr->argsz = sizeof(buf);
    hdr->flags = VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP;
    *get = {
        .iova = iova,
        .size = size,
        .bitmap = {.pgsize = pgsize, .size = sizeof(bits), .data = reinterpret_cast<__u64*>(bits)}};
    return ioctl_errno(f.c, VFIO_IOMMU_DIRTY_PAGES, hdr);
  };
  EXPECT_EQ(query(0x100000, 64 * kPage, kPage), EINVAL);  // tracking off
  vfio_iommu_type1_dirty_bitmap d{.argsz = sizeof(d), .flags = 0};
  EXPECT_EQ(ioctl_errno(f.c, VFIO_IOMMU_DIRTY_PAGES, &d), EINVAL);
  d.flags = VFIO_IOMMU_DIRTY_PAGES_FLAG_START | VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP;
  EXPECT_EQ(ioctl_errno(f.c, VFIO_IOMMU_DIRTY_PAGES, &d), EINVAL);
  d.flags = VFIO_IOMMU_DIRTY_PAGES_FLAG_START;
  ASSERT_EQ(ioctl_errno(f.c, VFIO_IOMMU_DIRTY_PAGES, &d), 0);
  ASSERT_EQ(ioctl_errno(f.c, VFIO_IOMMU_DIRTY_PAGES, &d), 0);  // idempotent
  EXPECT_EQ(query(0x100000, 64 * kPage, 2 * kPage), EINVAL);   // pgsize
  EXPECT_EQ(query(0x101000, 4 * kPage, kPage), EINVAL);        // bisects
  EXPECT_EQ(query(0x100800, 64 * kPage, kPage), EINVAL);       // misaligned
  EXPECT_EQ(query(0x100000, 0, kPage), EINVAL);
  EXPECT_EQ(query(0x100000, 1ULL << 30, kPage), EINVAL);  // bitmap too small
  char data[3 * kPage] = {};
  ASSERT_EQ(iomm_vfio_group_dma_rw(f.group, 0x100000 + 10 * kPage + 100, data, 2 * kPage, 1), 0);
  ASSERT_EQ(iomm_vfio_group_dma_rw(f.group, 0x100000 + 40 * kPage, data, 10, 0), 0);  // read
  ASSERT_EQ(query(0x100000, 64 * kPage, kPage), 0);
  EXPECT_EQ(bits[0], 7ULL << 10);  // exact: pages 10, 11, 12
  EXPECT_EQ(bits[1], 0U);
  ASSERT_EQ(query(0x100000, 64 * kPage, kPage), 0);
  EXPECT_EQ(bits[0], 0U);  // cleared by the read
  // Unmap with GET_DIRTY_BITMAP.
  ASSERT_EQ(iomm_vfio_group_dma_rw(f.group, 0x100000 + 63 * kPage, data, 1, 1), 0);
  alignas(8) unsigned char ubuf[sizeof(vfio_iommu_type1_dma_unmap) + sizeof(vfio_bitmap)] = {};
  auto* u = reinterpret_cast<vfio_iommu_type1_dma_unmap*>(ubuf);
  auto* ub = reinterpret_cast<vfio_bitmap*>(u->data);
  u->argsz = sizeof(ubuf);
  u->flags = VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP | VFIO_DMA_UNMAP_FLAG_ALL;
  EXPECT_EQ(ioctl_errno(f.c, VFIO_IOMMU_UNMAP_DMA, u), EINVAL);
  u->flags = VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP;
  u->iova = 0x100000;
  u->size = 64 * kPage;
  *ub = {.pgsize = kPage, .size = sizeof(bits), .data = reinterpret_cast<__u64*>(bits)};
  bits[0] = bits[1] = 0;
  ASSERT_EQ(ioctl_errno(f.c, VFIO_IOMMU_UNMAP_DMA, u), 0);
  EXPECT_EQ(u->size, 64 * kPage);
  EXPECT_EQ(bits[0], 1ULL << 63);
}

TEST(VfioLiveUpdate, MemfdVaddrIsCheckedAndDmaKeepsWorking) {
  iomm::test::Memfd fd(64 * kPage);
  auto* c = iomm_vfio_open();
  auto* sw = iomm_vfio_group_create_software(c, nullptr);
  ASSERT_EQ(iomm_vfio_ioctl(c, VFIO_SET_IOMMU, (void*)VFIO_TYPE1v2_IOMMU), 0);
  // The registered fd lets the library map the file itself, unprivileged
  // (UnprivilegedMap.* and PrivilegedMap.* cover the other ways).
  ASSERT_EQ(iomm_vfio_register_fd(c, fd.fd()), 0);
  auto* old_va = new Mem(16 * kPage, MAP_SHARED, fd.fd(), 0);
  ASSERT_EQ(map(c, 0x100000, old_va->va(), 16 * kPage), 0);
  uint64_t n = 0;
  EXPECT_EQ(unmap(c, 0x100000, 16 * kPage, VFIO_DMA_UNMAP_FLAG_VADDR, &n), 0);
  EXPECT_EQ(n, 16 * kPage);
  EXPECT_EQ(unmap(c, 0x100000, 16 * kPage, VFIO_DMA_UNMAP_FLAG_VADDR, &n), EINVAL);
  EXPECT_EQ(n, 16 * kPage);  // a failed unmap leaves the caller's size as passed
  // A new group while a vaddr is invalid: EBUSY.
  errno = 0;
  EXPECT_EQ(iomm_vfio_group_create_software(c, nullptr), nullptr);
  EXPECT_EQ(errno, EBUSY);
  delete old_va;  // the old address space is gone; DMA keeps working
  char byte = 42;
  EXPECT_EQ(iomm_vfio_group_dma_rw(sw, 0x100000 + kPage, &byte, 1, 1), 0);
  Mem wrong(16 * kPage, MAP_SHARED, fd.fd(), 16 * kPage);  // other offset
  EXPECT_EQ(map(c, 0x100000, wrong.va(), 16 * kPage, VFIO_DMA_MAP_FLAG_VADDR), EINVAL);
  Mem anon(16 * kPage);
  EXPECT_EQ(map(c, 0x100000, anon.va(), 16 * kPage, VFIO_DMA_MAP_FLAG_VADDR), EINVAL);
  EXPECT_EQ(map(c, 0x100000, anon.va(), 8 * kPage, VFIO_DMA_MAP_FLAG_VADDR), EINVAL);  // size
  Mem right(16 * kPage, MAP_SHARED, fd.fd(), 0);
  EXPECT_EQ(map(c, 0x100000, right.va(), 16 * kPage, VFIO_DMA_MAP_FLAG_VADDR), 0);
  EXPECT_EQ(static_cast<char*>(right.p)[kPage], 42);
  EXPECT_EQ(map(c, 0x100000, right.va(), 16 * kPage, VFIO_DMA_MAP_FLAG_VADDR), EINVAL);
  EXPECT_EQ(unmap(c, 0, 0, VFIO_DMA_UNMAP_FLAG_ALL), 0);
  iomm_vfio_group_destroy(sw);
  iomm_vfio_close(c);
}

TEST(VfioLiveUpdate, AnonymousVaddrSwitchesDomains) {
  auto* c = iomm_vfio_open();
  auto* sw = iomm_vfio_group_create_software(c, nullptr);
  ASSERT_EQ(iomm_vfio_ioctl(c, VFIO_SET_IOMMU, (void*)VFIO_TYPE1v2_IOMMU), 0);
  Mem a(4 * kPage);
  Mem b(4 * kPage);
  ASSERT_EQ(map(c, 0x100000, a.va(), 4 * kPage), 0);
  ASSERT_EQ(unmap(c, 0x100000, 4 * kPage, VFIO_DMA_UNMAP_FLAG_VADDR), 0);
  ASSERT_EQ(map(c, 0x100000, b.va(), 4 * kPage, VFIO_DMA_MAP_FLAG_VADDR), 0);
  char byte = 9;
  EXPECT_EQ(iomm_vfio_group_dma_rw(sw, 0x100000, &byte, 1, 1), 0);
  EXPECT_EQ(static_cast<char*>(b.p)[0], 9);
  EXPECT_EQ(static_cast<char*>(a.p)[0], 0);
  iomm_vfio_group_destroy(sw);
  iomm_vfio_close(c);
}

TEST(VfioLiveUpdate, OwnerChangeMovesTheCharge) {
  iomm::test::WithoutIpcLock no_cap;
  iomm::test::Memfd fd(16 * kPage);
  const int other = getppid();
  ASSERT_OK(iomm::set_memlock_limit(iomm::AccountMode::per_process, other, 0));
  auto* c = iomm_vfio_open();
  auto* sw = iomm_vfio_group_create_software(c, nullptr);
  ASSERT_EQ(iomm_vfio_ioctl(c, VFIO_SET_IOMMU, (void*)VFIO_TYPE1v2_IOMMU), 0);
  ASSERT_EQ(iomm_vfio_register_fd(c, fd.fd()), 0);
  Mem m(16 * kPage, MAP_SHARED, fd.fd(), 0);
  ASSERT_EQ(map(c, 0x100000, m.va(), 16 * kPage), 0);
  EXPECT_EQ(iomm::counters().charged_bytes, 16 * kPage);
  ASSERT_EQ(unmap(c, 0x100000, 16 * kPage, VFIO_DMA_UNMAP_FLAG_VADDR), 0);
  ASSERT_EQ(iomm_vfio_set_owner_pid(c, other), 0);
  // The new owner has no budget: ENOMEM, and the old charge stays.
  EXPECT_EQ(map(c, 0x100000, m.va(), 16 * kPage, VFIO_DMA_MAP_FLAG_VADDR), ENOMEM);
  EXPECT_EQ(iomm::counters().charged_bytes, 16 * kPage);
  ASSERT_OK(iomm::set_memlock_limit(iomm::AccountMode::per_process, other, 1 << 30));
  EXPECT_EQ(map(c, 0x100000, m.va(), 16 * kPage, VFIO_DMA_MAP_FLAG_VADDR), 0);
  const auto counters = iomm::counters();
  EXPECT_EQ(counters.charged_bytes, 16 * kPage);
  for (const auto& o : counters.owners) {
    if (o.charged_bytes != 0) {
      EXPECT_EQ(o.id, other);
    }
  }
  EXPECT_EQ(unmap(c, 0, 0, VFIO_DMA_UNMAP_FLAG_ALL), 0);
  iomm_vfio_group_destroy(sw);
  iomm_vfio_close(c);
  ASSERT_OK(iomm::set_memlock_limit(iomm::AccountMode::per_process, other, std::nullopt));
}

}  // namespace

namespace {

// An UNMAP with GET_DIRTY_BITMAP that fails (here: a mediated driver that
// never unpins, so the unmap ends in EDEADLOCK) must not consume the dirty
// bits: a later GET_BITMAP still reports the written page.
TEST(VfioDirty, FailedUnmapKeepsTheDirtyLog) {
  auto* c = iomm_vfio_open();
  auto* sw = iomm_vfio_group_create_software(c, nullptr);
  auto* md = iomm_vfio_group_create_mediated(
      c, [](void*, uint64_t, uint64_t) {}, nullptr);
  ASSERT_EQ(iomm_vfio_ioctl(c, VFIO_SET_IOMMU, reinterpret_cast<void*>(VFIO_TYPE1v2_IOMMU)), 0);
  Mem m(64 * kPage);
  ASSERT_EQ(map(c, 0x100000, m.va(), 64 * kPage), 0);
  vfio_iommu_type1_dirty_bitmap start{.argsz = sizeof(start),
                                      .flags = VFIO_IOMMU_DIRTY_PAGES_FLAG_START};
  ASSERT_EQ(ioctl_errno(c, VFIO_IOMMU_DIRTY_PAGES, &start), 0);
  void* host[1];
  ASSERT_EQ(iomm_vfio_pin_pages(md, 0x100000, 1, IOMM_VFIO_PROT_READ, host), 1);
  char byte = 1;
  ASSERT_EQ(iomm_vfio_group_dma_rw(sw, 0x100000 + 5 * kPage, &byte, 1, 1), 0);

  uint64_t bits[1] = {};
  alignas(8) unsigned char ubuf[sizeof(vfio_iommu_type1_dma_unmap) + sizeof(vfio_bitmap)] = {};
  auto* u = reinterpret_cast<vfio_iommu_type1_dma_unmap*>(ubuf);
  u->argsz = sizeof(ubuf);
  u->flags = VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP;
  u->iova = 0x100000;
  u->size = 64 * kPage;
  *reinterpret_cast<vfio_bitmap*>(u->data) = {
      .pgsize = kPage, .size = sizeof(bits), .data = reinterpret_cast<__u64*>(bits)};
  EXPECT_EQ(ioctl_errno(c, VFIO_IOMMU_UNMAP_DMA, u), EDEADLOCK);
  EXPECT_EQ(u->size, 64 * kPage);  // nothing is written back on failure

  alignas(8) unsigned char
      gbuf[sizeof(vfio_iommu_type1_dirty_bitmap) + sizeof(vfio_iommu_type1_dirty_bitmap_get)] = {};
  auto* hdr = reinterpret_cast<vfio_iommu_type1_dirty_bitmap*>(gbuf);
  hdr->argsz = sizeof(gbuf);
  hdr->flags = VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP;
  *reinterpret_cast<vfio_iommu_type1_dirty_bitmap_get*>(hdr->data) = {
      .iova = 0x100000,
      .size = 64 * kPage,
      .bitmap = {.pgsize = kPage, .size = sizeof(bits), .data = reinterpret_cast<__u64*>(bits)}};
  bits[0] = 0;
  ASSERT_EQ(ioctl_errno(c, VFIO_IOMMU_DIRTY_PAGES, hdr), 0);
  EXPECT_EQ(bits[0], (1ULL << 5) | 1ULL);  // the written page, and the pinned one

  ASSERT_EQ(iomm_vfio_unpin_pages(md, 0x100000, 1), 1);
  iomm_vfio_group_destroy(md);
  iomm_vfio_group_destroy(sw);
  iomm_vfio_close(c);
}

}  // namespace
