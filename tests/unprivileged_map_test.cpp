// The type1 layer as an ordinary user (issue 7 item 1): shared file memory
// maps without /proc/self/map_files, keeps its file identity for VADDR
// updates, and a registered fd keeps DMA working after the caller unmaps.
// The bodies run in a child that drops root when the suite runs as root.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/vfio.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>

#include "iomm/accounting.hpp"
#include "iomm/vfio_compat.h"
#include "test_support.hpp"
#include "vfio_test_support.hpp"

namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kLen = 16 * kPage;
constexpr uint64_t kIova = 0x100000;

using iomm::test::vfio::dma;
using iomm::test::vfio::map;
using iomm::test::vfio::unmap;
using Container = iomm::test::vfio::SoftwareContainer;

char* map_shared(int fd, uint64_t len, off_t offset = 0) {
  void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset);
  return p == MAP_FAILED ? nullptr : static_cast<char*>(p);
}

TEST(UnprivilegedMap, UnmodifiedType1CodeMapsMemfdAndDmaReachesIt) {
  const int status = iomm::test::run_unprivileged([] {
    ASSERT_FALSE(iomm::test::can_reopen_map_files());
    iomm::test::Memfd fd(kLen);
    char* mem = map_shared(fd.fd(), kLen);
    ASSERT_NE(mem, nullptr);
    {
      Container k;
      ASSERT_EQ(map(k.c, kIova, mem, kLen), 0);  // was EFAULT
      char byte = 42;
      EXPECT_EQ(dma(k.sw, kIova + kPage, &byte, 1), 0);
      EXPECT_EQ(mem[kPage], 42);
      mem[2 * kPage] = 17;
      EXPECT_EQ(dma(k.sw, kIova + 2 * kPage, &byte, 0), 0);
      EXPECT_EQ(byte, 17);
      // Pinned by address: invalidating the vaddr would let DMA stop when
      // the caller unmaps, so it needs the fd (the privileged case).
      EXPECT_EQ(unmap(k.c, kIova, kLen, VFIO_DMA_UNMAP_FLAG_VADDR), EPERM);
      // Nothing changed: the vaddr is still valid, DMA still works.
      EXPECT_EQ(unmap(k.c, kIova, kLen, VFIO_DMA_UNMAP_FLAG_VADDR), EPERM);
      EXPECT_EQ(dma(k.sw, kIova + kPage, &byte, 0), 0);
      EXPECT_EQ(byte, 42);
      EXPECT_EQ(unmap(k.c, kIova, kLen), 0);
    }
    EXPECT_EQ(iomm::counters().pinned_bytes, 0U);
    munmap(mem, kLen);
  });
  EXPECT_EQ(status, 0);
}

TEST(UnprivilegedMap, RegisteredFdKeepsDmaWorkingAfterTheCallerUnmaps) {
  const int status = iomm::test::run_unprivileged([] {
    iomm::test::Memfd fd(4 * kLen);
    char* mem = map_shared(fd.fd(), kLen);
    ASSERT_NE(mem, nullptr);
    {
      Container k;
      ASSERT_EQ(iomm_vfio_register_fd(k.c, fd.fd()), 0);
      ASSERT_EQ(map(k.c, kIova, mem, kLen), 0);
      ASSERT_EQ(unmap(k.c, kIova, kLen, VFIO_DMA_UNMAP_FLAG_VADDR), 0);
      munmap(mem, kLen);
      // The caller's addresses are gone; the library's mapping is not.
      char byte = 55;
      EXPECT_EQ(dma(k.sw, kIova + 3 * kPage, &byte, 1), 0);
      char seen = 0;
      ASSERT_EQ(pread(fd.fd(), &seen, 1, 3 * kPage), 1);
      EXPECT_EQ(seen, 55);
      // The VADDR update is checked against the identity from maps.
      char* wrong = map_shared(fd.fd(), kLen, static_cast<off_t>(kLen));
      ASSERT_NE(wrong, nullptr);
      EXPECT_EQ(map(k.c, kIova, wrong, kLen, VFIO_DMA_MAP_FLAG_VADDR), EINVAL);
      void* anon = mmap(nullptr, kLen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      ASSERT_NE(anon, MAP_FAILED);
      EXPECT_EQ(map(k.c, kIova, anon, kLen, VFIO_DMA_MAP_FLAG_VADDR), EINVAL);
      iomm::test::Memfd other(kLen);
      char* other_mem = map_shared(other.fd(), kLen);
      ASSERT_NE(other_mem, nullptr);
      EXPECT_EQ(map(k.c, kIova, other_mem, kLen, VFIO_DMA_MAP_FLAG_VADDR), EINVAL);
      char* right = map_shared(fd.fd(), kLen);
      ASSERT_NE(right, nullptr);
      EXPECT_EQ(map(k.c, kIova, right, kLen, VFIO_DMA_MAP_FLAG_VADDR), 0);
      EXPECT_EQ(right[3 * kPage], 55);
      EXPECT_EQ(unmap(k.c, kIova, kLen), 0);
      EXPECT_EQ(iomm_vfio_unregister_fd(k.c, fd.fd()), 0);
      errno = 0;
      EXPECT_EQ(iomm_vfio_unregister_fd(k.c, fd.fd()), -1);
      EXPECT_EQ(errno, ENOENT);
      munmap(right, kLen);
      munmap(other_mem, kLen);
      munmap(anon, kLen);
      munmap(wrong, kLen);
    }
    EXPECT_EQ(iomm::counters().pinned_bytes, 0U);
  });
  EXPECT_EQ(status, 0);
}

TEST(UnprivilegedMap, RegisteredReadOnlyFdGivesReadOnlyDma) {
  const int status = iomm::test::run_unprivileged([] {
    iomm::test::Memfd fd(kLen);
    char path[64];
    std::snprintf(path, sizeof(path), "/proc/self/fd/%d", fd.fd());
    const int ro = open(path, O_RDONLY | O_CLOEXEC);
    ASSERT_GE(ro, 0);
    char* mem = map_shared(fd.fd(), kLen);
    ASSERT_NE(mem, nullptr);
    {
      Container k;
      ASSERT_EQ(iomm_vfio_register_fd(k.c, ro), 0);
      // The registered fd cannot write, so a write mapping is type1's EFAULT.
      EXPECT_EQ(map(k.c, kIova, mem, kLen), EFAULT);
      ASSERT_EQ(map(k.c, kIova, mem, kLen, VFIO_DMA_MAP_FLAG_READ), 0);
      char byte = 1;
      EXPECT_EQ(dma(k.sw, kIova, &byte, 1), EPERM);
      EXPECT_EQ(mem[0], 0);
      EXPECT_EQ(unmap(k.c, kIova, kLen), 0);
    }
    munmap(mem, kLen);
    close(ro);
  });
  EXPECT_EQ(status, 0);
}

TEST(UnprivilegedMap, RegisterFdErrors) {
  auto* c = iomm_vfio_open();
  errno = 0;
  EXPECT_EQ(iomm_vfio_register_fd(c, -1), -1);
  EXPECT_EQ(errno, EBADF);
  const int dir = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  ASSERT_GE(dir, 0);
  errno = 0;
  EXPECT_EQ(iomm_vfio_register_fd(c, dir), -1);
  EXPECT_EQ(errno, EINVAL);
  close(dir);
  iomm::test::Memfd fd(kLen);
  errno = 0;
  EXPECT_EQ(iomm_vfio_unregister_fd(c, fd.fd()), -1);
  EXPECT_EQ(errno, ENOENT);
  EXPECT_EQ(iomm_vfio_register_fd(c, fd.fd()), 0);
  EXPECT_EQ(iomm_vfio_register_fd(c, fd.fd()), 0);  // replaces
  errno = 0;
  EXPECT_EQ(iomm_vfio_register_fd(nullptr, fd.fd()), -1);
  EXPECT_EQ(errno, EBADF);
  iomm_vfio_close(c);  // closes the registry's duplicate
}

// With CAP_SYS_ADMIN and no registration the file is reopened through
// map_files: the privileged path of the same calls.
TEST(PrivilegedMap, MapFilesKeepsDmaWorkingAfterTheCallerUnmaps) {
  IOMM_NEEDS_ROOT("reopening files through /proc/self/map_files needs CAP_SYS_ADMIN");
  ASSERT_TRUE(iomm::test::can_reopen_map_files());
  iomm::test::Memfd fd(kLen);
  char* mem = map_shared(fd.fd(), kLen);
  ASSERT_NE(mem, nullptr);
  Container k;
  ASSERT_EQ(map(k.c, kIova, mem, kLen), 0);
  ASSERT_EQ(unmap(k.c, kIova, kLen, VFIO_DMA_UNMAP_FLAG_VADDR), 0);
  munmap(mem, kLen);
  char byte = 66;
  EXPECT_EQ(dma(k.sw, kIova, &byte, 1), 0);
  char* right = map_shared(fd.fd(), kLen);
  ASSERT_NE(right, nullptr);
  EXPECT_EQ(map(k.c, kIova, right, kLen, VFIO_DMA_MAP_FLAG_VADDR), 0);
  EXPECT_EQ(right[0], 66);
  EXPECT_EQ(unmap(k.c, kIova, kLen), 0);
  munmap(right, kLen);
}

}  // namespace
