#include "mem/safe_copy.hpp"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace iomm::mem {
namespace {

constexpr size_t kBytes = 2 * 4096;

// A MAP_SHARED memfd mapping that can be made to vanish by truncation.
class ShrinkableMapping {
 public:
  ShrinkableMapping() {
    fd_ = memfd_create("iomm-safe-copy-test", 0);
    EXPECT_GE(fd_, 0);
    EXPECT_EQ(ftruncate(fd_, kBytes), 0);
    void* mapping = mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
    EXPECT_NE(mapping, MAP_FAILED);
    data_ = static_cast<char*>(mapping);
    std::memset(data_, 'x', kBytes);
  }
  ~ShrinkableMapping() {
    munmap(data_, kBytes);
    close(fd_);
  }
  ShrinkableMapping(const ShrinkableMapping&) = delete;
  ShrinkableMapping& operator=(const ShrinkableMapping&) = delete;

  void shrink() { EXPECT_EQ(ftruncate(fd_, 0), 0); }
  [[nodiscard]] char* data() const { return data_; }

 private:
  int fd_ = -1;
  char* data_ = nullptr;
};

// Death tests here must start from a process where iomm has not installed
// its handler yet, so the handler sees the action the test put in place.
class ScopedThreadsafeDeathTests {
 public:
  ScopedThreadsafeDeathTests() : saved_(GTEST_FLAG_GET(death_test_style)) {
    GTEST_FLAG_SET(death_test_style, "threadsafe");
  }
  ~ScopedThreadsafeDeathTests() { GTEST_FLAG_SET(death_test_style, saved_); }
  ScopedThreadsafeDeathTests(const ScopedThreadsafeDeathTests&) = delete;
  ScopedThreadsafeDeathTests& operator=(const ScopedThreadsafeDeathTests&) = delete;

 private:
  std::string saved_;
};

TEST(SafeCopy, CopiesNormally) {
  std::vector<char> source(10000, 'a');
  std::vector<char> destination(10000, 'b');
  EXPECT_TRUE(safe_copy(destination.data(), source.data(), source.size()));
  EXPECT_EQ(destination, source);
  EXPECT_TRUE(safe_copy(destination.data(), source.data(), 0));
}

TEST(SafeCopy, ReadFromTruncatedFileFailsEveryTime) {
  ShrinkableMapping mapping;
  std::vector<char> buf(kBytes);
  ASSERT_TRUE(safe_copy(buf.data(), mapping.data(), kBytes));
  EXPECT_EQ(buf, std::vector<char>(kBytes, 'x'));

  mapping.shrink();
  EXPECT_FALSE(safe_copy(buf.data(), mapping.data(), kBytes));
  // A second SIGBUS on the same thread must be caught as well.
  EXPECT_FALSE(safe_copy(buf.data(), mapping.data() + 4096, 16));

  std::vector<char> source(64, 'q');
  EXPECT_TRUE(safe_copy(buf.data(), source.data(), source.size()));
  EXPECT_EQ(std::string(buf.data(), 64), std::string(64, 'q'));
}

TEST(SafeCopy, WriteToTruncatedFileFails) {
  ShrinkableMapping mapping;
  mapping.shrink();
  std::vector<char> source(kBytes, 's');
  EXPECT_FALSE(safe_copy(mapping.data(), source.data(), kBytes));
  EXPECT_FALSE(safe_copy(mapping.data(), source.data(), kBytes));
}

TEST(SafeCopy, ConcurrentFaultsOnSeveralThreads) {
  ShrinkableMapping mapping;
  mapping.shrink();
  std::vector<std::thread> threads;
  std::atomic<int> unexpected{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      std::vector<char> buf(kBytes);
      std::vector<char> source(kBytes, 'z');
      for (int i = 0; i < 100; ++i) {
        if (safe_copy(buf.data(), mapping.data(), kBytes)) unexpected.fetch_add(1);
        if (!safe_copy(buf.data(), source.data(), kBytes)) unexpected.fetch_add(1);
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(unexpected.load(), 0);
}

void touch_truncated_mapping_outside_safe_copy() {
  ShrinkableMapping mapping;
  char byte = 0;
  if (!safe_copy(&byte, mapping.data(), 1)) _exit(3);  // installs the handler
  mapping.shrink();
  *static_cast<volatile char*>(mapping.data()) = 1;
  _exit(0);
}

TEST(SafeCopyDeathTest, SigbusOutsideSafeCopyStillKills) {
  const ScopedThreadsafeDeathTests threadsafe;
  EXPECT_EXIT(
      {
        std::signal(SIGBUS, SIG_DFL);
        touch_truncated_mapping_outside_safe_copy();
      },
      testing::KilledBySignal(SIGBUS), "");
}

extern "C" void exit_with_status_7(int /*signo*/) { _exit(7); }

TEST(SafeCopyDeathTest, SigbusOutsideSafeCopyReachesThePreviousHandler) {
  const ScopedThreadsafeDeathTests threadsafe;
  EXPECT_EXIT(
      {
        std::signal(SIGBUS, exit_with_status_7);
        touch_truncated_mapping_outside_safe_copy();
      },
      testing::ExitedWithCode(7), "");
}

TEST(SafeCopyDeathTest, SigbusOutsideSafeCopyIgnoredWhenPreviouslyIgnored) {
  const ScopedThreadsafeDeathTests threadsafe;
  // A sent SIGBUS (not a fault) while SIG_IGN was in place is ignored.
  EXPECT_EXIT(
      {
        std::signal(SIGBUS, SIG_IGN);
        char byte = 0;
        const char source = 1;
        if (!safe_copy(&byte, &source, 1)) _exit(3);
        raise(SIGBUS);
        _exit(5);
      },
      testing::ExitedWithCode(5), "");
}

}  // namespace
}  // namespace iomm::mem
