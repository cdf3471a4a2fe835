// Device DMA through a software domain into user memory that the caller
// unmapped or protected while it was still mapped in the IOAS: EFAULT and a
// recorded host_memory fault, never a crash.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "iomm/accounting.hpp"
#include "iomm/domain.hpp"
#include "iomm/ioas.hpp"
#include "iomm/source.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

constexpr uint32_t kRW = kProtRead | kProtWrite;
constexpr size_t kBytes = 4 * kPageSize;
constexpr uint64_t kIova = 0x100000;

// The test's premise: nothing was mapped at the old addresses since
// (mincore fails with ENOMEM only where nothing is mapped).
void expect_unmapped(void* address) {
  unsigned char residency[kBytes / kPageSize];
  ASSERT_EQ(mincore(address, kBytes, residency), -1) << "the addresses were reused";
  ASSERT_EQ(errno, ENOMEM);
}

// Anonymous memory mapped into an IOAS with a software domain attached.
class MappedUserMemory {
 public:
  MappedUserMemory() {
    void* memory =
        mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    EXPECT_NE(memory, MAP_FAILED);
    memory_ = static_cast<char*>(memory);
    std::memset(memory_, 'u', kBytes);
    ioas_ = Ioas::create({}).value();
    domain_ = SoftDomain::create({}).value();
    EXPECT_OK(ioas_->attach(domain_));
    EXPECT_OK(ioas_->map(*MemorySource::from_user(memory_, kBytes), kRW, kIova));
  }
  ~MappedUserMemory() {
    EXPECT_OK(ioas_->unmap(kIova, kBytes));
    EXPECT_OK(ioas_->detach(domain_));
    if (memory_ != nullptr) munmap(memory_, kBytes);
  }
  MappedUserMemory(const MappedUserMemory&) = delete;
  MappedUserMemory& operator=(const MappedUserMemory&) = delete;

  // Allocate what the test needs before this: a later allocation may reuse
  // the addresses, which no user-space check can tell from the old memory.
  void unmap_memory() {
    ASSERT_EQ(munmap(memory_, kBytes), 0);
    expect_unmapped(memory_);
    memory_ = nullptr;
  }
  void protect(int prot) { ASSERT_EQ(mprotect(memory_, kBytes, prot), 0); }
  [[nodiscard]] char* memory() const { return memory_; }
  [[nodiscard]] SoftDomain& domain() const { return *domain_; }

 private:
  char* memory_ = nullptr;
  std::shared_ptr<Ioas> ioas_;
  std::shared_ptr<SoftDomain> domain_;
};

void expect_one_fault(SoftDomain& domain, uint64_t iova, uint32_t access) {
  const std::vector<IommuFault> faults = domain.take_faults();
  ASSERT_EQ(faults.size(), 1U);
  EXPECT_EQ(faults[0].iova, iova);
  EXPECT_EQ(faults[0].requested, access);
  EXPECT_EQ(faults[0].reason, FaultReason::host_memory);
}

TEST(UserMemoryDma, CopiesWhileTheMemoryIsThere) {
  MappedUserMemory mapped;
  const std::vector<char> written(kBytes, 'w');
  ASSERT_OK(mapped.domain().dma_write(kIova, written.data(), kBytes));
  EXPECT_EQ(std::memcmp(mapped.memory(), written.data(), kBytes), 0);
  std::vector<char> read(kBytes);
  ASSERT_OK(mapped.domain().dma_read(kIova + 1, read.data(), kBytes - 1));
  EXPECT_EQ(std::memcmp(read.data(), written.data(), kBytes - 1), 0);
  EXPECT_TRUE(mapped.domain().take_faults().empty());
}

TEST(UserMemoryDma, UnmappedMemoryFailsWithEfaultAndAFault) {
  MappedUserMemory mapped;
  std::vector<char> buf(kBytes, 'w');
  mapped.unmap_memory();
  EXPECT_ERRNO(mapped.domain().dma_write(kIova, buf.data(), kBytes), EFAULT);
  expect_one_fault(mapped.domain(), kIova, kProtWrite);
  EXPECT_ERRNO(mapped.domain().dma_read(kIova + kPageSize, buf.data(), 16), EFAULT);
  expect_one_fault(mapped.domain(), kIova + kPageSize, kProtRead);
  EXPECT_EQ(mapped.domain().counters().faults, 2U);
}

TEST(UserMemoryDma, ProtNoneMemoryFailsBothWaysUntilRestored) {
  MappedUserMemory mapped;
  mapped.protect(PROT_NONE);
  std::vector<char> buf(kBytes, 'w');
  EXPECT_ERRNO(mapped.domain().dma_write(kIova, buf.data(), kBytes), EFAULT);
  expect_one_fault(mapped.domain(), kIova, kProtWrite);
  EXPECT_ERRNO(mapped.domain().dma_read(kIova, buf.data(), kBytes), EFAULT);
  expect_one_fault(mapped.domain(), kIova, kProtRead);

  mapped.protect(PROT_READ | PROT_WRITE);
  EXPECT_OK(mapped.domain().dma_write(kIova, buf.data(), kBytes));
  EXPECT_EQ(std::memcmp(mapped.memory(), buf.data(), kBytes), 0);
}

TEST(UserMemoryDma, ReadOnlyMemoryFailsWritesOnly) {
  MappedUserMemory mapped;
  mapped.protect(PROT_READ);
  const std::vector<char> written(kBytes, 'w');
  EXPECT_ERRNO(mapped.domain().dma_write(kIova, written.data(), kBytes), EFAULT);
  expect_one_fault(mapped.domain(), kIova, kProtWrite);
  EXPECT_EQ(mapped.memory()[0], 'u');

  std::vector<char> read(kBytes);
  ASSERT_OK(mapped.domain().dma_read(kIova, read.data(), kBytes));
  EXPECT_EQ(read, std::vector<char>(kBytes, 'u'));
  EXPECT_TRUE(mapped.domain().take_faults().empty());
}

TEST(UserMemoryDma, FaultNamesTheFirstVanishedSegment) {
  // Two mappings back to back in IOVA: file memory, then user memory that is
  // gone. The file part is copied, the fault names the user part's IOVA.
  test::Memfd mfd(kBytes);
  void* user = mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(user, MAP_FAILED);
  auto ioas = Ioas::create({}).value();
  auto domain = SoftDomain::create({}).value();
  ASSERT_OK(ioas->attach(domain));
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, kBytes), kRW, kIova));
  ASSERT_OK(ioas->map(*MemorySource::from_user(user, kBytes), kRW, kIova + kBytes));
  std::vector<char> buf(2 * kBytes, 'w');
  std::vector<char> read(kBytes);
  // Gone by protection rather than munmap: the DMA below allocates, and
  // under TSan its allocator may map new memory at a just-unmapped address
  // (UnmappedMemoryFailsWithEfaultAndAFault covers munmap).
  ASSERT_EQ(mprotect(user, kBytes, PROT_NONE), 0);

  EXPECT_ERRNO(domain->dma_write(kIova, buf.data(), buf.size()), EFAULT);
  expect_one_fault(*domain, kIova + kBytes, kProtWrite);
  ASSERT_OK(domain->dma_read(kIova, read.data(), kBytes));
  EXPECT_EQ(read, std::vector<char>(kBytes, 'w'));

  ASSERT_OK(ioas->unmap(kIova, 2 * kBytes));
  ASSERT_OK(ioas->detach(domain));
  EXPECT_EQ(counters().pinned_bytes, 0U);
  munmap(user, kBytes);
}

}  // namespace
}  // namespace iomm
