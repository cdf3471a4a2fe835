// Type1 struct copy-out, byte for byte (issue 7 item 7): what the caller's
// struct holds after UNMAP_DMA and GET_INFO, compared with the kernel's rules
// (a failed call writes nothing back; GET_INFO follows Linux 6.6+).
#include <gtest/gtest.h>
#include <linux/vfio.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <vector>

#include "iomm/vfio_compat.h"

namespace {

constexpr uint64_t kPage = 4096;
constexpr unsigned char kPattern = 0xa5;

struct Container {
  explicit Container(const iomm_vfio_sw_group_config* cfg = nullptr) {
    c = iomm_vfio_open();
    g = iomm_vfio_group_create_software(c, cfg);
    EXPECT_EQ(iomm_vfio_ioctl(c, VFIO_SET_IOMMU, reinterpret_cast<void*>(VFIO_TYPE1v2_IOMMU)), 0);
    mem = mmap(nullptr, 16 * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  }
  ~Container() {
    munmap(mem, 16 * kPage);
    iomm_vfio_group_destroy(g);
    iomm_vfio_close(c);
  }
  int map(uint64_t iova, uint64_t offset, uint64_t size) const {
    vfio_iommu_type1_dma_map m{.argsz = sizeof(m),
                               .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                               .vaddr = reinterpret_cast<uint64_t>(mem) + offset,
                               .iova = iova,
                               .size = size};
    return iomm_vfio_ioctl(c, VFIO_IOMMU_MAP_DMA, &m) == 0 ? 0 : errno;
  }
  iomm_vfio_container* c;
  iomm_vfio_group* g;
  void* mem;
};

// An UNMAP_DMA struct followed by a vfio_bitmap, every other byte kPattern.
struct UnmapArg {
  alignas(8) unsigned char bytes[sizeof(vfio_iommu_type1_dma_unmap) + sizeof(vfio_bitmap)];
  UnmapArg(uint32_t flags, uint64_t iova, uint64_t size) {
    std::memset(bytes, kPattern, sizeof(bytes));
    vfio_iommu_type1_dma_unmap u{};
    std::memcpy(&u, bytes, sizeof(u));
    u.argsz = sizeof(bytes);
    u.flags = flags;
    u.iova = iova;
    u.size = size;
    std::memcpy(bytes, &u, sizeof(u));
  }
};

TEST(VfioStructBytes, FailedUnmapWritesNothingBack) {
  Container v;
  ASSERT_EQ(v.map(0x100000, 0, 4 * kPage), 0);
  ASSERT_EQ(v.map(0x200000, 4 * kPage, 4 * kPage), 0);
  __u64 bits = 0;
  struct Case {
    const char* what;
    uint32_t flags;
    uint64_t iova;
    uint64_t size;
    int err;
  };
  const Case cases[] = {
      {"misaligned iova", 0, 0x100800, 4 * kPage, EINVAL},
      {"misaligned size", 0, 0x100000, 4 * kPage + 1, EINVAL},
      {"zero size", 0, 0x100000, 0, EINVAL},
      {"v2 bisects the start", 0, 0x101000, 3 * kPage, EINVAL},
      {"v2 bisects the end", 0, 0x100000, 2 * kPage, EINVAL},
      {"ALL with a range", VFIO_DMA_UNMAP_FLAG_ALL, 0x100000, 4 * kPage, EINVAL},
      {"ALL with an odd iova only", VFIO_DMA_UNMAP_FLAG_ALL, 0x1000, 0, EINVAL},
      {"unknown flag", 1U << 7, 0x100000, 4 * kPage, EINVAL},
      {"wraps", 0, 0xfffffffffffff000ULL, 2 * kPage, EINVAL},
      {"bitmap with tracking off", VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, 0x100000, 4 * kPage,
       EINVAL},
  };
  for (const Case& k : cases) {
    UnmapArg arg(k.flags, k.iova, k.size);
    if ((k.flags & VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP) != 0) {
      const vfio_bitmap bm{.pgsize = kPage, .size = sizeof(bits), .data = &bits};
      std::memcpy(arg.bytes + sizeof(vfio_iommu_type1_dma_unmap), &bm, sizeof(bm));
    }
    unsigned char before[sizeof(arg.bytes)];
    std::memcpy(before, arg.bytes, sizeof(before));
    errno = 0;
    EXPECT_EQ(iomm_vfio_ioctl(v.c, VFIO_IOMMU_UNMAP_DMA, arg.bytes), -1) << k.what;
    EXPECT_EQ(errno, k.err) << k.what;
    for (size_t i = 0; i < sizeof(before); ++i) {
      ASSERT_EQ(arg.bytes[i], before[i]) << k.what << ": byte " << i << " changed";
    }
  }
  // A VADDR unmap of an already-invalid range fails and keeps `size` too.
  UnmapArg first(VFIO_DMA_UNMAP_FLAG_VADDR, 0x100000, 4 * kPage);
  ASSERT_EQ(iomm_vfio_ioctl(v.c, VFIO_IOMMU_UNMAP_DMA, first.bytes), 0);
  UnmapArg again(VFIO_DMA_UNMAP_FLAG_VADDR, 0x100000, 4 * kPage);
  unsigned char before[sizeof(again.bytes)];
  std::memcpy(before, again.bytes, sizeof(before));
  errno = 0;
  EXPECT_EQ(iomm_vfio_ioctl(v.c, VFIO_IOMMU_UNMAP_DMA, again.bytes), -1);
  EXPECT_EQ(errno, EINVAL);
  EXPECT_EQ(std::memcmp(again.bytes, before, sizeof(before)), 0);
}

TEST(VfioStructBytes, SuccessfulUnmapWritesOnlyTheHeaderWithTheSize) {
  Container v;
  ASSERT_EQ(v.map(0x100000, 0, 4 * kPage), 0);
  UnmapArg arg(0, 0x100000, 64 * kPage);  // covers the mapping and a hole
  unsigned char expected[sizeof(arg.bytes)];
  std::memcpy(expected, arg.bytes, sizeof(expected));
  const uint64_t unmapped = 4 * kPage;
  std::memcpy(expected + offsetof(vfio_iommu_type1_dma_unmap, size), &unmapped, sizeof(unmapped));
  ASSERT_EQ(iomm_vfio_ioctl(v.c, VFIO_IOMMU_UNMAP_DMA, arg.bytes), 0);
  for (size_t i = 0; i < sizeof(expected); ++i) {
    ASSERT_EQ(arg.bytes[i], expected[i]) << "byte " << i;
  }
}

// The reply GET_INFO gives with a large enough argsz.
std::vector<unsigned char> full_reply(iomm_vfio_container* c) {
  vfio_iommu_type1_info probe{.argsz = sizeof(probe)};
  EXPECT_EQ(iomm_vfio_ioctl(c, VFIO_IOMMU_GET_INFO, &probe), 0);
  std::vector<unsigned char> reply(probe.argsz, 0);
  auto* info = reinterpret_cast<vfio_iommu_type1_info*>(reply.data());
  info->argsz = probe.argsz;
  EXPECT_EQ(iomm_vfio_ioctl(c, VFIO_IOMMU_GET_INFO, info), 0);
  return reply;
}

// Every argsz from 12 to past the full reply: compare every byte of the
// caller's buffer with the 6.6+ kernel's. The info struct is zero-filled
// and min(argsz, sizeof(info)) bytes of it go back; the chain goes back only
// when it fits whole.
void check_every_argsz(iomm_vfio_container* c, size_t expected_full) {
  const std::vector<unsigned char> full = full_reply(c);
  ASSERT_EQ(full.size(), expected_full);
  vfio_iommu_type1_info head{};
  std::memcpy(&head, full.data(), sizeof(head));
  ASSERT_EQ(head.flags, VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS);
  ASSERT_EQ(head.cap_offset, sizeof(vfio_iommu_type1_info));
  for (size_t argsz = 12; argsz <= full.size() + 16; ++argsz) {
    std::vector<unsigned char> buf(full.size() + 64, kPattern);
    const auto len32 = static_cast<uint32_t>(argsz);
    std::memcpy(buf.data(), &len32, sizeof(len32));
    std::vector<unsigned char> expected = buf;
    errno = 0;
    const long r = iomm_vfio_ioctl(c, VFIO_IOMMU_GET_INFO, buf.data());
    if (argsz < 16) {
      EXPECT_EQ(r, -1) << argsz;
      EXPECT_EQ(errno, EINVAL) << argsz;
    } else {
      ASSERT_EQ(r, 0) << argsz;
      vfio_iommu_type1_info info{};
      info.flags = head.flags;
      info.iova_pgsizes = head.iova_pgsizes;
      if (argsz < full.size()) {
        info.argsz = static_cast<uint32_t>(full.size());  // what it takes
      } else {
        info.argsz = len32;
        info.cap_offset = sizeof(info);
        std::memcpy(expected.data() + sizeof(info), full.data() + sizeof(info),
                    full.size() - sizeof(info));
      }
      std::memcpy(expected.data(), &info, std::min(argsz, sizeof(info)));
    }
    for (size_t i = 0; i < buf.size(); ++i) {
      ASSERT_EQ(buf[i], expected[i]) << "argsz " << argsz << ", byte " << i;
    }
  }
}

// 24 header + MIGRATION 32 + DMA_AVAIL 16 (12 padded to 8) + IOVA_RANGE
// 16 + 16 per range: the Linux 6.6+ layout.
TEST(VfioStructBytes, GetInfoEveryArgszOneRange) {
  Container v;
  check_every_argsz(v.c, 24 + 32 + 16 + 16 + 16);
}

// Two ranges, like intel-iommu's MSI window: 120 bytes in all, as the
// kernel (6.6+) gives.
TEST(VfioStructBytes, GetInfoEveryArgszTwoRanges) {
  const iomm_vfio_reserved_range msi{0xfee00000, 0xfeefffff};
  const iomm_vfio_sw_group_config cfg{.reserved = &msi, .nr_reserved = 1};
  Container v(&cfg);
  check_every_argsz(v.c, 120);
}

TEST(VfioStructBytes, FailedGetInfoWritesNothing) {
  Container v;
  for (uint32_t argsz : {0U, 1U, 8U, 15U}) {
    std::vector<unsigned char> buf(64, kPattern);
    std::memcpy(buf.data(), &argsz, sizeof(argsz));
    const std::vector<unsigned char> before = buf;
    errno = 0;
    EXPECT_EQ(iomm_vfio_ioctl(v.c, VFIO_IOMMU_GET_INFO, buf.data()), -1);
    EXPECT_EQ(errno, EINVAL);
    EXPECT_EQ(buf, before) << "argsz " << argsz;
  }
}

}  // namespace
