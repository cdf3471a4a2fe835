// MAP_DMA of shared file memory that is not one whole huge-aligned VMA
// (issue 7 item 6): a 4 KiB-aligned sub-range of hugetlb memory pins and
// charges the huge pages that cover it and maps 4 KiB leaves at its ends; a
// range over several VMAs of one file (split by mprotect or madvise) keeps
// the file's identity.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/vfio.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <functional>

#include "iomm/accounting.hpp"
#include "iomm/domain.hpp"
#include "iomm/ioas.hpp"
#include "iomm/source.hpp"
#include "iomm/vfio_compat.h"
#include "test_support.hpp"
#include "vfio_test_support.hpp"

namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kHuge = 2 << 20;
constexpr uint64_t kIova = 0x40000000;

using iomm::test::vfio::dma;
using iomm::test::vfio::map;
using iomm::test::vfio::unmap;
using Container = iomm::test::vfio::SoftwareContainer;

// How the library reaches the file behind the vaddrs.
enum class Way {
  registered,  // unprivileged, fd registered: its own mapping
  by_address,  // unprivileged, nothing registered: the caller's addresses
  map_files,   // CAP_SYS_ADMIN, nothing registered: its own mapping
};

// Runs body each way this process can (map_files needs CAP_SYS_ADMIN).
void every_way(const std::function<void(Way)>& body) {
  EXPECT_EQ(iomm::test::run_unprivileged([&] { body(Way::registered); }), 0);
  EXPECT_EQ(iomm::test::run_unprivileged([&] { body(Way::by_address); }), 0);
  if (iomm::test::can_reopen_map_files()) body(Way::map_files);
}

// The answer to invalidating the vaddr: refused when DMA would depend on
// the caller's addresses.
int vaddr_invalidation(Way way) { return way == Way::by_address ? EPERM : 0; }

TEST(HugetlbSubRange, SourceAtA4KOffsetPinsCoveringHugePagesAndMaps4KLeaves) {
  IOMM_NEEDS(iomm::test::hugetlb_available(4 * kHuge), "2 MiB huge pages (vm.nr_hugepages)");
  iomm::test::Memfd huge(4 * kHuge, MFD_HUGETLB);
  auto src = iomm::MemorySource::from_file(huge.fd(), kPage, kHuge);
  ASSERT_OK(src);
  auto ioas = iomm::Ioas::create({}).value();
  auto domain = iomm::SoftDomain::create({}).value();
  ASSERT_OK(ioas->attach(domain));
  ASSERT_OK(ioas->map(*src, iomm::kProtRead | iomm::kProtWrite, kIova + kPage));
  EXPECT_EQ(iomm::counters().pinned_bytes, 2 * kHuge);  // huge pages 0 and 1
  EXPECT_GT(domain->counters().leaves_4k, 0U);
  const char first = 1;
  const char last = 2;
  ASSERT_OK(domain->dma_write(kIova + kPage, &first, 1));
  ASSERT_OK(domain->dma_write(kIova + kPage + kHuge - 1, &last, 1));
  const auto* host = static_cast<const char*>(src->host_address());
  EXPECT_EQ(host[0], 1);
  EXPECT_EQ(host[kHuge - 1], 2);
  ASSERT_OK(ioas->unmap(kIova + kPage, kHuge));
  EXPECT_EQ(iomm::counters().pinned_bytes, 0U);
  ASSERT_OK(ioas->detach(domain));
}

TEST(HugetlbSubRange, Type1MapsA4KAlignedSubRangeOfSharedHugetlbMemory) {
  IOMM_NEEDS(iomm::test::hugetlb_available(4 * kHuge), "2 MiB huge pages (vm.nr_hugepages)");
  every_way([](Way way) {
    iomm::test::Memfd huge(2 * kHuge, MFD_HUGETLB);
    void* p = mmap(nullptr, 2 * kHuge, PROT_READ | PROT_WRITE, MAP_SHARED, huge.fd(), 0);
    ASSERT_NE(p, MAP_FAILED);
    auto* mem = static_cast<char*>(p);
    {
      Container k;
      if (way == Way::registered) {
        ASSERT_EQ(iomm_vfio_register_fd(k.c, huge.fd()), 0);
      }
      // QEMU splits RAM sections at small offsets: [4 KiB, 2 MiB + 64 KiB)
      // and the rest, at adjacent IOVAs.
      const uint64_t cut = kHuge + 16 * kPage;
      EXPECT_EQ(map(k.c, kIova + kPage, mem + kPage, cut - kPage), 0);  // was EINVAL
      EXPECT_EQ(map(k.c, kIova + cut, mem + cut, 2 * kHuge - cut), 0);
      // Through the file, whole huge pages are pinned; by address, 4 KiB ones.
      EXPECT_EQ(iomm::counters().pinned_bytes,
                way == Way::by_address ? 2 * kHuge - kPage : 2 * kHuge);
      if (way != Way::map_files) {  // unprivileged: no CAP_IPC_LOCK, so charged
        EXPECT_EQ(iomm::counters().charged_bytes, iomm::counters().pinned_bytes);
      }
      char byte = 77;
      EXPECT_EQ(dma(k.sw, kIova + cut - 1, &byte, 1), 0);
      EXPECT_EQ(mem[cut - 1], 77);
      byte = 78;
      EXPECT_EQ(dma(k.sw, kIova + cut, &byte, 1), 0);
      EXPECT_EQ(mem[cut], 78);
      // The file's identity holds for a VADDR update of a sub-range.
      ASSERT_EQ(unmap(k.c, kIova + cut, 2 * kHuge - cut, VFIO_DMA_UNMAP_FLAG_VADDR),
                vaddr_invalidation(way));
      if (way != Way::by_address) {
        EXPECT_EQ(map(k.c, kIova + cut, mem + cut, 2 * kHuge - cut, VFIO_DMA_MAP_FLAG_VADDR), 0);
      }
      EXPECT_EQ(unmap(k.c, 0, 0, VFIO_DMA_UNMAP_FLAG_ALL), 0);
      EXPECT_EQ(iomm::counters().pinned_bytes, 0U);
    }
    munmap(p, 2 * kHuge);
  });
}

// A range over two VMAs of one mapping split by mprotect: pinned as the
// file (its VADDR update to an unsplit mapping of the same offsets is
// accepted), and a write mapping over the read-only half is type1's EFAULT.
void split_range(int fd, uint64_t len, uint64_t split, Way way) {
  void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ASSERT_NE(p, MAP_FAILED);
  auto* mem = static_cast<char*>(p);
  ASSERT_EQ(mprotect(mem + split, len - split, PROT_READ), 0);
  Container k;
  if (way == Way::registered) {
    ASSERT_EQ(iomm_vfio_register_fd(k.c, fd), 0);
  }
  EXPECT_EQ(map(k.c, kIova, mem, len), EFAULT);
  EXPECT_EQ(iomm::counters().pinned_bytes, 0U);
  ASSERT_EQ(map(k.c, kIova, mem, len, VFIO_DMA_MAP_FLAG_READ), 0);
  ASSERT_EQ(unmap(k.c, kIova, len, VFIO_DMA_UNMAP_FLAG_VADDR), vaddr_invalidation(way));
  if (way == Way::by_address) {
    // Pinned by address: DMA reads the caller's mapping.
    mem[split - 1] = 12;
    char byte = 0;
    EXPECT_EQ(dma(k.sw, kIova + split - 1, &byte, 0), 0);
    EXPECT_EQ(byte, 12);
    EXPECT_EQ(unmap(k.c, kIova, len), 0);
    munmap(p, len);
    return;
  }
  munmap(p, len);
  void* q = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ASSERT_NE(q, MAP_FAILED);
  auto* again = static_cast<char*>(q);
  again[split + 5] = 91;
  EXPECT_EQ(map(k.c, kIova, again, len, VFIO_DMA_MAP_FLAG_VADDR), 0);  // was EINVAL
  char byte = 0;
  EXPECT_EQ(dma(k.sw, kIova + split + 5, &byte, 0), 0);
  EXPECT_EQ(byte, 91);
  EXPECT_EQ(unmap(k.c, kIova, len), 0);
  munmap(q, len);
}

TEST(SplitVma, RangeOverAnMprotectSplitKeepsTheFileIdentity) {
  every_way([](Way way) {
    iomm::test::Memfd fd(16 * kPage);
    split_range(fd.fd(), 16 * kPage, 8 * kPage, way);
  });
}

TEST(SplitVma, HugetlbRangeOverAnMprotectSplitKeepsTheFileIdentity) {
  IOMM_NEEDS(iomm::test::hugetlb_available(4 * kHuge), "2 MiB huge pages (vm.nr_hugepages)");
  every_way([](Way way) {
    iomm::test::Memfd huge(2 * kHuge, MFD_HUGETLB);
    split_range(huge.fd(), 2 * kHuge, kHuge, way);
  });
}

TEST(SplitVma, RangeOverAnMadviseSplitMapsForWrite) {
  every_way([](Way way) {
    iomm::test::Memfd fd(16 * kPage);
    void* p = mmap(nullptr, 16 * kPage, PROT_READ | PROT_WRITE, MAP_SHARED, fd.fd(), 0);
    ASSERT_NE(p, MAP_FAILED);
    auto* mem = static_cast<char*>(p);
    ASSERT_EQ(madvise(mem + 4 * kPage, 4 * kPage, MADV_DONTFORK), 0);  // three VMAs
    {
      Container k;
      if (way == Way::registered) {
        ASSERT_EQ(iomm_vfio_register_fd(k.c, fd.fd()), 0);
      }
      ASSERT_EQ(map(k.c, kIova, mem + kPage, 12 * kPage), 0);
      ASSERT_EQ(unmap(k.c, kIova, 12 * kPage, VFIO_DMA_UNMAP_FLAG_VADDR), vaddr_invalidation(way));
      if (way != Way::by_address) {
        // Same file, other offset: not the same object.
        EXPECT_EQ(map(k.c, kIova, mem, 12 * kPage, VFIO_DMA_MAP_FLAG_VADDR), EINVAL);
        EXPECT_EQ(map(k.c, kIova, mem + kPage, 12 * kPage, VFIO_DMA_MAP_FLAG_VADDR), 0);
      }
      char byte = 33;
      EXPECT_EQ(dma(k.sw, kIova + 10 * kPage, &byte, 1), 0);
      EXPECT_EQ(mem[11 * kPage], 33);
      EXPECT_EQ(unmap(k.c, kIova, 12 * kPage), 0);
    }
    munmap(p, 16 * kPage);
  });
}

}  // namespace
