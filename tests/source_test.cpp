// Memory sources: validation errors, page identity, read-only files.
#include "iomm/source.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "iomm/range.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

using test::Memfd;

TEST(Source, FileRangeErrors) {
  Memfd mfd(1 << 20);
  EXPECT_ERRNO(MemorySource::from_file(mfd.fd(), 0, 0), EINVAL);
  EXPECT_ERRNO(MemorySource::from_file(mfd.fd(), 0, (1 << 20) + 1), EINVAL);
  EXPECT_ERRNO(MemorySource::from_file(mfd.fd(), 1 << 20, kPageSize), EINVAL);
  EXPECT_ERRNO(MemorySource::from_file(mfd.fd(), UINT64_MAX - 10, 4096), EOVERFLOW);
  EXPECT_ERRNO(MemorySource::from_file(mfd.fd(), 4096, UINT64_MAX), EOVERFLOW);
  EXPECT_ERRNO(MemorySource::from_file(-1, 0, 4096), EBADF);
  EXPECT_ERRNO(MemorySource::from_file(12345, 0, 4096), EBADF);
}

TEST(Source, FdThatCannotBeMappedShared) {
  int pipefd[2];
  ASSERT_EQ(pipe(pipefd), 0);
  EXPECT_ERRNO(MemorySource::from_file(pipefd[0], 0, 4096), ENODEV);
  close(pipefd[0]);
  close(pipefd[1]);
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  EXPECT_ERRNO(MemorySource::from_file(sv[0], 0, 4096), ENODEV);
  close(sv[0]);
  close(sv[1]);
  const int devnull = open("/dev/null", O_RDWR);
  EXPECT_ERRNO(MemorySource::from_file(devnull, 0, 4096), ENODEV);
  close(devnull);
}

TEST(Source, SameInodeMappedOnce) {
  Memfd mfd(4 << 20);
  auto a = MemorySource::from_file(mfd.fd(), 0, 1 << 20);
  const int dup_fd = dup(mfd.fd());
  auto b = MemorySource::from_file(dup_fd, 1 << 20, 1 << 20);
  close(dup_fd);
  ASSERT_OK(a);
  ASSERT_OK(b);
  EXPECT_EQ(a->object(), b->object());
  EXPECT_EQ(static_cast<std::byte*>(a->host_address()) + (1 << 20), b->host_address());
  // Writes through the library's mapping reach the file.
  static_cast<char*>(b->host_address())[0] = 'x';
  char c = 0;
  ASSERT_EQ(pread(mfd.fd(), &c, 1, 1 << 20), 1);
  EXPECT_EQ(c, 'x');
}

TEST(Source, HostAddressKeepsHugeAlignment) {
  Memfd mfd(8 << 20);
  auto s = MemorySource::from_file(mfd.fd(), 2 << 20, 2 << 20);
  ASSERT_OK(s);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(s->host_address()) % (2 << 20), 0U);
}

TEST(Source, GrownFileIsExtendedInPlace) {
  Memfd mfd(1 << 20);
  auto a = MemorySource::from_file(mfd.fd(), 0, 1 << 20);
  ASSERT_OK(a);
  ASSERT_EQ(ftruncate(mfd.fd(), 4 << 20), 0);
  auto b = MemorySource::from_file(mfd.fd(), 3 << 20, 1 << 20);
  ASSERT_OK(b);
  EXPECT_EQ(a->object(), b->object());
  static_cast<char*>(b->host_address())[5] = 'y';
  char c = 0;
  ASSERT_EQ(pread(mfd.fd(), &c, 1, (3 << 20) + 5), 1);
  EXPECT_EQ(c, 'y');
}

TEST(Source, ReadOnlyFdGivesReadOnlySource) {
  Memfd mfd(1 << 20);
  const std::string path = "/proc/self/fd/" + std::to_string(mfd.fd());
  const int ro = open(path.c_str(), O_RDONLY);
  ASSERT_GE(ro, 0);
  auto s = MemorySource::from_file(ro, 0, 1 << 20);
  close(ro);
  ASSERT_OK(s);
  EXPECT_FALSE(s->writable());
}

TEST(Source, SealsAreReported) {
  Memfd sealed(1 << 20, MFD_ALLOW_SEALING);
  ASSERT_EQ(fcntl(sealed.fd(), F_ADD_SEALS, F_SEAL_SHRINK), 0);
  auto s = MemorySource::from_file(sealed.fd(), 0, 1 << 20);
  ASSERT_OK(s);
  EXPECT_TRUE(s->shrink_sealed());
  Memfd unsealed(1 << 20, 0, test::Shrink::allowed);
  auto u = MemorySource::from_file(unsealed.fd(), 0, 1 << 20, FileSeal::allow_shrink);
  ASSERT_OK(u);
  EXPECT_FALSE(u->shrink_sealed());
}

TEST(Source, UserAndSimulatedValidation) {
  EXPECT_ERRNO(MemorySource::from_user(reinterpret_cast<void*>(0x1000), 0), EINVAL);
  EXPECT_ERRNO(MemorySource::from_user(reinterpret_cast<void*>(UINT64_MAX - 4095), 8192),
               EOVERFLOW);
  EXPECT_ERRNO(MemorySource::simulated(0), EINVAL);
  EXPECT_ERRNO(MemorySource::simulated((1ULL << 47) + 1), EINVAL);
  auto sim = MemorySource::simulated(1ULL << 40);
  ASSERT_OK(sim);
  EXPECT_EQ(sim->kind(), SourceKind::simulated);
  EXPECT_EQ(sim->host_address(), nullptr);
  // Nothing is checked for user memory until it is pinned.
  EXPECT_TRUE(MemorySource::from_user(reinterpret_cast<void*>(0x1000), 4096).ok());
}

TEST(Source, HugetlbRangesNeedOnlyPageAlignment) {
  IOMM_NEEDS(test::hugetlb_available(4 << 20), "2 MiB huge pages (vm.nr_hugepages)");
  Memfd huge(4 << 20, MFD_HUGETLB);
  auto sub = MemorySource::from_file(huge.fd(), 4096, 2 << 20);
  ASSERT_OK(sub);
  EXPECT_EQ(sub->page_size(), 2U << 20);
  EXPECT_OK(MemorySource::from_file(huge.fd(), 0, 4096));
  EXPECT_ERRNO(MemorySource::from_file(huge.fd(), 4096, 4 << 20), EINVAL);  // past the end
  auto s = MemorySource::from_file(huge.fd(), 2 << 20, 2 << 20);
  ASSERT_OK(s);
  EXPECT_EQ(s->page_size(), 2U << 20);
}

}  // namespace
}  // namespace iomm
