// mlock is not counted by the kernel: unpinning user memory must not munlock
// pages the application had locked itself (mlock, mlockall).
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "iomm/accounting.hpp"
#include "iomm/domain.hpp"
#include "iomm/ioas.hpp"
#include "iomm/source.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

constexpr uint32_t kRW = kProtRead | kProtWrite;
constexpr size_t kPages = 8;
constexpr uint64_t kIova = 0x100000;

// VmLck of this process, in bytes.
uint64_t locked_bytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmLck:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
  }
  ADD_FAILURE() << "no VmLck in /proc/self/status";
  return 0;
}

// Whether the VMA containing `address` carries the kernel's locked flag.
bool vma_locked(const void* address) {
  const auto target = reinterpret_cast<uintptr_t>(address);
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool inside = false;
  while (std::getline(smaps, line)) {
    uintptr_t start = 0;
    uintptr_t end = 0;
    char dash = 0;
    std::istringstream header(line);
    if (header >> std::hex >> start >> dash >> end && dash == '-') {
      inside = target >= start && target < end;
      continue;
    }
    if (inside && line.rfind("VmFlags:", 0) == 0) return line.find(" lo") != std::string::npos;
  }
  ADD_FAILURE() << "no VMA at " << address;
  return false;
}

// The application's own locks, as raw system calls: the sanitizer runtimes
// replace mlock() and mlockall() with no-ops.
int app_mlock(const void* address, size_t length) {
  return static_cast<int>(syscall(SYS_mlock, address, length));
}
int app_munlock(const void* address, size_t length) {
  return static_cast<int>(syscall(SYS_munlock, address, length));
}

class Buffer {
 public:
  Buffer() {
    void* memory = mmap(nullptr, kPages * kPageSize, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    EXPECT_NE(memory, MAP_FAILED);
    memory_ = static_cast<char*>(memory);
    std::memset(memory_, 1, kPages * kPageSize);
  }
  ~Buffer() { munmap(memory_, kPages * kPageSize); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  [[nodiscard]] char* page(size_t index) const { return memory_ + index * kPageSize; }

 private:
  char* memory_ = nullptr;
};

// Map pages [first, first + count) of buffer into an IOAS (pinned at once by
// an attached domain) and unmap them again.
void pin_and_unpin(const Buffer& buffer, size_t first, size_t count,
                   uint64_t* locked_while_pinned) {
  auto ioas = Ioas::create({}).value();
  auto domain = SoftDomain::create({}).value();
  ASSERT_OK(ioas->attach(domain));
  ASSERT_OK(ioas->map(*MemorySource::from_user(buffer.page(first), count * kPageSize), kRW, kIova));
  *locked_while_pinned = locked_bytes();
  ASSERT_OK(ioas->unmap(kIova, count * kPageSize));
  ASSERT_OK(ioas->detach(domain));
  EXPECT_EQ(counters().pinned_bytes, 0U);
}

TEST(ApplicationMlock, OwnLockIsReleasedOnUnpin) {
  Buffer buffer;
  const uint64_t before = locked_bytes();
  uint64_t pinned = 0;
  pin_and_unpin(buffer, 2, 4, &pinned);
  EXPECT_EQ(pinned, before + 4 * kPageSize);
  EXPECT_EQ(locked_bytes(), before);
  EXPECT_FALSE(vma_locked(buffer.page(2)));
}

TEST(ApplicationMlock, ApplicationLockSurvivesPinAndUnpinOfPart) {
  Buffer buffer;
  const uint64_t before = locked_bytes();
  ASSERT_EQ(app_mlock(buffer.page(0), kPages * kPageSize), 0);
  uint64_t pinned = 0;
  pin_and_unpin(buffer, 2, 4, &pinned);
  EXPECT_EQ(pinned, before + kPages * kPageSize);
  EXPECT_EQ(locked_bytes(), before + kPages * kPageSize);
  for (size_t i = 0; i < kPages; ++i) EXPECT_TRUE(vma_locked(buffer.page(i))) << "page " << i;
  ASSERT_EQ(app_munlock(buffer.page(0), kPages * kPageSize), 0);
}

TEST(ApplicationMlock, OverlapUnlocksOnlyWhatIommuLocked) {
  // The application locks pages 0-3; iomm pins 2-7. After the unpin 0-3 are
  // still locked and 4-7 are not.
  Buffer buffer;
  const uint64_t before = locked_bytes();
  ASSERT_EQ(app_mlock(buffer.page(0), 4 * kPageSize), 0);
  uint64_t pinned = 0;
  pin_and_unpin(buffer, 2, 6, &pinned);
  EXPECT_EQ(pinned, before + kPages * kPageSize);
  EXPECT_EQ(locked_bytes(), before + 4 * kPageSize);
  for (size_t i = 0; i < 4; ++i) EXPECT_TRUE(vma_locked(buffer.page(i))) << "page " << i;
  for (size_t i = 4; i < kPages; ++i) EXPECT_FALSE(vma_locked(buffer.page(i))) << "page " << i;
  ASSERT_EQ(app_munlock(buffer.page(0), 4 * kPageSize), 0);
}

TEST(ApplicationMlock, ApplicationLockBetweenTwoPinsSurvives) {
  // Two separate application-locked runs with an unlocked page between
  // them, pinned and unpinned in one piece.
  Buffer buffer;
  const uint64_t before = locked_bytes();
  ASSERT_EQ(app_mlock(buffer.page(1), kPageSize), 0);
  ASSERT_EQ(app_mlock(buffer.page(3), 2 * kPageSize), 0);
  uint64_t pinned = 0;
  pin_and_unpin(buffer, 0, kPages, &pinned);
  EXPECT_EQ(pinned, before + kPages * kPageSize);
  EXPECT_EQ(locked_bytes(), before + 3 * kPageSize);
  const bool expected[kPages] = {false, true, false, true, true, false, false, false};
  for (size_t i = 0; i < kPages; ++i) EXPECT_EQ(vma_locked(buffer.page(i)), expected[i]) << i;
  ASSERT_EQ(app_munlock(buffer.page(0), kPages * kPageSize), 0);
}

TEST(ApplicationMlock, MlockallFutureSurvivesPinAndUnpin) {
  // MCL_FUTURE alone locks only new mappings, which keeps this within an
  // unprivileged memlock limit.
  ASSERT_EQ(syscall(SYS_mlockall, MCL_FUTURE), 0) << std::strerror(errno);
  {
    Buffer buffer;
    ASSERT_TRUE(vma_locked(buffer.page(0)));
    uint64_t pinned = 0;
    pin_and_unpin(buffer, 2, 4, &pinned);
    for (size_t i = 0; i < kPages; ++i) EXPECT_TRUE(vma_locked(buffer.page(i))) << "page " << i;
  }
  ASSERT_EQ(syscall(SYS_munlockall), 0);
}

}  // namespace
}  // namespace iomm
