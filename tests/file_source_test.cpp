// File sources: writability per source (the fd it was made from, the file's
// seals), the shared window's upgrade, and pages discarded under a pin.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "iomm/accounting.hpp"
#include "iomm/domain.hpp"
#include "iomm/ioas.hpp"
#include "iomm/source.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

constexpr uint32_t kRW = kProtRead | kProtWrite;
constexpr uint64_t kPage = 4096;
constexpr uint64_t kLen = 16 * kPage;

// Another open file description of fd's file, with its own access mode.
int reopen(int fd, int flags) {
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
  return open(path, flags | O_CLOEXEC);
}

struct Attached {
  std::shared_ptr<Ioas> ioas = Ioas::create({}).value();
  std::shared_ptr<SoftDomain> domain = SoftDomain::create({}).value();
  Attached() { EXPECT_OK(ioas->attach(domain)); }
  ~Attached() {
    EXPECT_OK(ioas->detach(domain));
    ioas.reset();
  }
};

TEST(FileSourceWritability, ReadOnlyFdAfterReadWriteGivesAReadOnlySource) {
  test::Memfd mfd(kLen);
  auto rw = MemorySource::from_file(mfd.fd(), 0, kLen);
  ASSERT_OK(rw);
  EXPECT_TRUE(rw->writable());
  const int ro_fd = reopen(mfd.fd(), O_RDONLY);
  ASSERT_GE(ro_fd, 0);
  auto ro = MemorySource::from_file(ro_fd, 0, kLen);
  ASSERT_OK(ro);
  EXPECT_EQ(ro->object(), rw->object());  // one window for the inode
  EXPECT_FALSE(ro->writable());
  {
    Attached a;
    EXPECT_ERRNO(a.ioas->map(*ro, kRW, 0x100000), EPERM);
    EXPECT_EQ(counters().pinned_bytes, 0U);
    ASSERT_OK(a.ioas->map(*ro, kProtRead, 0x100000));
    const char byte = 7;
    EXPECT_ERRNO(a.domain->dma_write(0x100000 + kPage, &byte, 1), EPERM);
    char seen = 1;
    ASSERT_EQ(pread(mfd.fd(), &seen, 1, kPage), 1);
    EXPECT_EQ(seen, 0);
    char read = 1;
    EXPECT_OK(a.domain->dma_read(0x100000 + kPage, &read, 1));
    EXPECT_EQ(read, 0);
    // The read-write source still maps for write.
    ASSERT_OK(a.ioas->map(*rw, kRW, 0x200000));
    EXPECT_OK(a.domain->dma_write(0x200000 + kPage, &byte, 1));
    ASSERT_EQ(pread(mfd.fd(), &seen, 1, kPage), 1);
    EXPECT_EQ(seen, 7);
  }
  close(ro_fd);
}

TEST(FileSourceWritability, ReadWriteFdAfterReadOnlyUpgradesTheWindow) {
  test::Memfd mfd(kLen);
  const int ro_fd = reopen(mfd.fd(), O_RDONLY);
  ASSERT_GE(ro_fd, 0);
  auto ro = MemorySource::from_file(ro_fd, 0, kLen);
  ASSERT_OK(ro);
  EXPECT_FALSE(ro->writable());
  {
    Attached a;
    // Pinned through the read-only window: the upgrade must keep it locked.
    ASSERT_OK(a.ioas->map(*ro, kProtRead, 0x100000));
    EXPECT_EQ(counters().vmlck_bytes, kLen);
    auto rw = MemorySource::from_file(mfd.fd(), 0, kLen);
    ASSERT_OK(rw);
    EXPECT_TRUE(rw->writable());
    EXPECT_FALSE(ro->writable());
    EXPECT_EQ(rw->object(), ro->object());
    EXPECT_EQ(counters().vmlck_bytes, kLen);
    ASSERT_OK(a.ioas->map(*rw, kRW, 0x200000));
    EXPECT_EQ(counters().pinned_bytes, kLen);  // the same pages, pinned once
    const char byte = 9;
    EXPECT_OK(a.domain->dma_write(0x200000 + 3 * kPage, &byte, 1));
    char seen = 0;
    ASSERT_EQ(pread(mfd.fd(), &seen, 1, 3 * kPage), 1);
    EXPECT_EQ(seen, 9);
    char read = 0;
    EXPECT_OK(a.domain->dma_read(0x100000 + 3 * kPage, &read, 1));
    EXPECT_EQ(read, 9);
    EXPECT_ERRNO(a.domain->dma_write(0x100000, &byte, 1), EPERM);
    // Sources made later from the read-only fd stay read-only.
    auto again = MemorySource::from_file(ro_fd, 0, kPage);
    ASSERT_OK(again);
    EXPECT_FALSE(again->writable());
  }
  close(ro_fd);
}

// The upgrade replaces the window under running DMA and pin churn: DMA
// through it never fails, pins made meanwhile stay locked.
TEST(FileSourceWritability, UpgradeUnderConcurrentDmaAndPins) {
  test::Memfd mfd(4 * kLen);
  const int ro_fd = reopen(mfd.fd(), O_RDONLY);
  ASSERT_GE(ro_fd, 0);
  auto ro = MemorySource::from_file(ro_fd, 0, 4 * kLen);
  ASSERT_OK(ro);
  Attached a;
  ASSERT_OK(a.ioas->map(ro->slice(0, kLen), kProtRead, 0x100000));
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::thread reader([&] {
    char byte = 0;
    while (!stop.load()) {
      if (!a.domain->dma_read(0x100000 + kPage, &byte, 1).ok()) failures.fetch_add(1);
    }
  });
  std::thread churn([&] {
    while (!stop.load()) {
      if (!a.ioas->map(ro->slice(2 * kLen, kLen), kProtRead, 0x400000).ok() ||
          !a.ioas->unmap(0x400000, kLen).ok()) {
        failures.fetch_add(1);
      }
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  auto rw = MemorySource::from_file(mfd.fd(), 0, 4 * kLen);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  stop.store(true);
  reader.join();
  churn.join();
  ASSERT_OK(rw);
  EXPECT_TRUE(rw->writable());
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(counters().vmlck_bytes, kLen);
  ASSERT_OK(a.ioas->map(rw->slice(kLen, kLen), kRW, 0x200000));
  const char byte = 4;
  EXPECT_OK(a.domain->dma_write(0x200000, &byte, 1));
  close(ro_fd);
}

TEST(FileSourceWritability, GrowingThroughAReadOnlyFdKeepsTheWindowWritable) {
  test::Memfd mfd(kLen);
  auto rw = MemorySource::from_file(mfd.fd(), 0, kLen);
  ASSERT_OK(rw);
  ASSERT_EQ(ftruncate(mfd.fd(), 4 * kLen), 0);
  const int ro_fd = reopen(mfd.fd(), O_RDONLY);
  ASSERT_GE(ro_fd, 0);
  // Extending a read-write window with a read-only fd used to fail.
  auto ro = MemorySource::from_file(ro_fd, 2 * kLen, kLen);
  ASSERT_OK(ro);
  EXPECT_FALSE(ro->writable());
  auto rw2 = MemorySource::from_file(mfd.fd(), 2 * kLen, kLen);
  ASSERT_OK(rw2);
  EXPECT_TRUE(rw2->writable());
  Attached a;
  ASSERT_OK(a.ioas->map(*rw2, kRW, 0x100000));
  const char byte = 5;
  EXPECT_OK(a.domain->dma_write(0x100000, &byte, 1));
  char seen = 0;
  ASSERT_EQ(pread(mfd.fd(), &seen, 1, 2 * kLen), 1);
  EXPECT_EQ(seen, 5);
  close(ro_fd);
}

TEST(FileSourceWritability, WriteSealedFileGivesAReadOnlySource) {
  const int fd = memfd_create("iomm-sealed", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, static_cast<off_t>(kLen)), 0);
  ASSERT_EQ(fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_WRITE), 0);
  auto s = MemorySource::from_file(fd, 0, kLen);
  ASSERT_OK(s);
  EXPECT_FALSE(s->writable());
  Attached a;
  EXPECT_ERRNO(a.ioas->map(*s, kRW, 0x100000), EPERM);
  close(fd);
}

int sealable_memfd(uint64_t size) {
  const int fd = memfd_create("iomm-seal", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd >= 0 && ftruncate(fd, static_cast<off_t>(size)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

TEST(FileSeal, ApplyForbidsHolePunchingAndShrinkingAndKeepsDmaWrites) {
  const int fd = sealable_memfd(kLen);
  ASSERT_GE(fd, 0);
  auto s = MemorySource::from_file(fd, 0, kLen, FileSeal::apply);
  ASSERT_OK(s);
  EXPECT_TRUE(s->writable());
  EXPECT_TRUE(s->shrink_sealed());
  EXPECT_EQ(fcntl(fd, F_GET_SEALS), F_SEAL_SHRINK | F_SEAL_FUTURE_WRITE);
  // This is what the seal is for (shmem refuses both under it).
  errno = 0;
  EXPECT_EQ(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, kPage), -1);
  EXPECT_EQ(errno, EPERM);
  errno = 0;
  EXPECT_EQ(ftruncate(fd, kPage), -1);
  EXPECT_EQ(errno, EPERM);
  {
    Attached a;
    ASSERT_OK(a.ioas->map(*s, kRW, 0x100000));
    const char byte = 3;
    EXPECT_OK(a.domain->dma_write(0x100000 + kPage, &byte, 1));
    char seen = 0;
    ASSERT_EQ(pread(fd, &seen, 1, kPage), 1);
    EXPECT_EQ(seen, 3);
  }
  // Later sources see the write seal: read-only, and `require` is met.
  auto later = MemorySource::from_file(fd, 0, kLen, FileSeal::require);
  ASSERT_OK(later);
  EXPECT_FALSE(later->writable());
  EXPECT_EQ(s->discarded_pages(), 0U);
  close(fd);
}

TEST(FileSeal, ByDefaultAFileThatCanShrinkIsRefusedUnlessTheCallerOptsIn) {
  test::Memfd loose(kLen, 0, test::Shrink::allowed);
  EXPECT_ERRNO(MemorySource::from_file(loose.fd(), 0, kLen), EPERM);
  const int sealable = sealable_memfd(kLen);
  ASSERT_GE(sealable, 0);
  EXPECT_ERRNO(MemorySource::from_file(sealable, 0, kLen), EPERM);
  ASSERT_EQ(fcntl(sealable, F_ADD_SEALS, F_SEAL_SHRINK), 0);
  auto sealed = MemorySource::from_file(sealable, 0, kLen);
  ASSERT_OK(sealed);
  EXPECT_TRUE(sealed->shrink_sealed());
  EXPECT_TRUE(sealed->writable());
  auto opted = MemorySource::from_file(loose.fd(), 0, kLen, FileSeal::allow_shrink);
  ASSERT_OK(opted);
  EXPECT_FALSE(opted->shrink_sealed());
  // A tmpfs file that cannot be sealed at all needs the opt-in too.
  char path[] = "/dev/shm/iomm-seal-XXXXXX";
  const int tmp = mkstemp(path);
  ASSERT_GE(tmp, 0);
  unlink(path);
  ASSERT_EQ(ftruncate(tmp, kLen), 0);
  EXPECT_ERRNO(MemorySource::from_file(tmp, 0, kLen), EPERM);
  EXPECT_OK(MemorySource::from_file(tmp, 0, kLen, FileSeal::allow_shrink));
  close(tmp);
  close(sealable);
}

TEST(FileSeal, RequireRefusesAnUnsealedFile) {
  test::Memfd mfd(kLen);
  EXPECT_ERRNO(MemorySource::from_file(mfd.fd(), 0, kLen, FileSeal::require), EPERM);
  const int fd = sealable_memfd(kLen);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK), 0);  // shrink alone is not enough
  EXPECT_ERRNO(MemorySource::from_file(fd, 0, kLen, FileSeal::require), EPERM);
  close(fd);
}

TEST(FileSeal, ShrinkSealAddedLaterIsSeen) {
  const int fd = sealable_memfd(kLen);
  ASSERT_GE(fd, 0);
  auto first = MemorySource::from_file(fd, 0, kLen, FileSeal::allow_shrink);
  ASSERT_OK(first);
  EXPECT_FALSE(first->shrink_sealed());
  ASSERT_EQ(fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK), 0);
  auto second = MemorySource::from_file(fd, 0, kLen);
  ASSERT_OK(second);
  EXPECT_TRUE(second->shrink_sealed());
  EXPECT_TRUE(first->shrink_sealed());  // one object per inode
  close(fd);
}

TEST(FileSeal, ApplyFailsWhereSealsCannotBeAdded) {
  test::Memfd unsealable(kLen, 0, test::Shrink::allowed);  // F_SEAL_SEAL is set
  EXPECT_ERRNO(MemorySource::from_file(unsealable.fd(), 0, kLen, FileSeal::apply), EPERM);
  const int fd = sealable_memfd(kLen);
  ASSERT_GE(fd, 0);
  const int ro_fd = reopen(fd, O_RDONLY);
  ASSERT_GE(ro_fd, 0);
  EXPECT_ERRNO(MemorySource::from_file(ro_fd, 0, kLen, FileSeal::apply), EPERM);
  EXPECT_EQ(fcntl(fd, F_GET_SEALS), 0);
  close(ro_fd);
  close(fd);
}

TEST(FileDiscard, HolePunchedUnderAPinIsCountedAtUnpin) {
  test::Memfd mfd(kLen);
  auto s = MemorySource::from_file(mfd.fd(), 0, kLen);
  ASSERT_OK(s);
  {
    Attached a;
    ASSERT_OK(a.ioas->map(*s, kRW, 0x100000));
    // The kernel lets anyone holding the fd do this to pinned, charged pages.
    ASSERT_EQ(fallocate(mfd.fd(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2 * kPage, 2 * kPage),
              0);
    EXPECT_EQ(s->discarded_pages(), 0U);
    ASSERT_OK(a.ioas->unmap(0x100000, kLen));
  }
  EXPECT_EQ(s->discarded_pages(), 2U);
}

// hugetlb unpins ask the file's block count instead of mincore while the file
// holds all its pages; a punched huge page still counts, in 4 KiB pages.
TEST(FileDiscard, HugePagePunchedUnderAPinIsCountedAtUnpin) {
  constexpr uint64_t kHuge = 2ULL << 20;
  IOMM_NEEDS(test::hugetlb_available(2 * kHuge), "2 MiB huge pages (vm.nr_hugepages)");
  test::Memfd mfd(2 * kHuge, MFD_HUGETLB);
  auto s = MemorySource::from_file(mfd.fd(), 0, 2 * kHuge);
  ASSERT_OK(s);
  {
    Attached a;
    ASSERT_OK(a.ioas->map(*s, kRW, 0x40000000));
    ASSERT_OK(a.ioas->unmap(0x40000000, 2 * kHuge));
    EXPECT_EQ(s->discarded_pages(), 0U);
    ASSERT_OK(a.ioas->map(*s, kRW, 0x40000000));
    ASSERT_EQ(fallocate(mfd.fd(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, kHuge, kHuge), 0);
    ASSERT_OK(a.ioas->unmap(0x40000000, 2 * kHuge));
  }
  EXPECT_EQ(s->discarded_pages(), kHuge / kPage);
}

// A hugetlb file's window is 1 GiB-aligned like any other (domains use 1 GiB
// leaves for it), and unpinning leaves nothing locked whether or not the
// kernel marks hugetlb VMAs locked (unpins skip the munlock when it does not).
TEST(FileHugetlb, WindowIsGigabyteAlignedAndUnpinLeavesNothingLocked) {
  constexpr uint64_t kHuge = 2ULL << 20;
  IOMM_NEEDS(test::hugetlb_available(2 * kHuge), "2 MiB huge pages (vm.nr_hugepages)");
  test::Memfd mfd(2 * kHuge, MFD_HUGETLB);
  auto s = MemorySource::from_file(mfd.fd(), 0, 2 * kHuge);
  ASSERT_OK(s);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(s->host_address()) % (1ULL << 30), 0U);
  const uint64_t vmlck = process_vmlck_bytes();
  {
    Attached a;
    for (int round = 0; round < 2; ++round) {
      ASSERT_OK(a.ioas->map(*s, kRW, 0x40000000));
      EXPECT_EQ(counters().pinned_bytes, 2 * kHuge);
      ASSERT_OK(a.ioas->unmap(0x40000000, 2 * kHuge));
      EXPECT_EQ(counters().pinned_bytes, 0U);
      EXPECT_EQ(process_vmlck_bytes(), vmlck) << "round " << round;
    }
  }
  EXPECT_EQ(s->discarded_pages(), 0U);
}

}  // namespace
}  // namespace iomm
