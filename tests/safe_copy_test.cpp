#include "mem/safe_copy.hpp"

#include <gtest/gtest.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "iomm/guarded_copy.hpp"
#include "iomm/signals.hpp"
#include "iomm/source.hpp"

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

class SafeCopy : public testing::Test {
 protected:
  void SetUp() override { install_signal_handlers(); }
};

TEST_F(SafeCopy, CopiesNormally) {
  std::vector<char> source(10000, 'a');
  std::vector<char> destination(10000, 'b');
  EXPECT_TRUE(safe_copy(destination.data(), source.data(), source.size()));
  EXPECT_EQ(destination, source);
  EXPECT_TRUE(safe_copy(destination.data(), source.data(), 0));
}

TEST_F(SafeCopy, ReadFromTruncatedFileFailsEveryTime) {
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

TEST(GuardedCopy, CopiesAndTurnsATruncationIntoEfaultBothWays) {
  ShrinkableMapping mapping;
  std::vector<char> buf(kBytes, 'b');
  ASSERT_TRUE(guarded_copy(buf.data(), mapping.data(), kBytes).ok());
  EXPECT_EQ(buf, std::vector<char>(kBytes, 'x'));

  mapping.shrink();
  const Status read = guarded_copy(buf.data(), mapping.data() + 4096, 64);
  EXPECT_EQ(read.code(), EFAULT);
  const Status write = guarded_copy(mapping.data(), buf.data(), 64);
  EXPECT_EQ(write.code(), EFAULT);
  EXPECT_TRUE(guarded_copy(buf.data(), buf.data() + 128, 64).ok());
}

TEST_F(SafeCopy, WriteToTruncatedFileFails) {
  ShrinkableMapping mapping;
  mapping.shrink();
  std::vector<char> source(kBytes, 's');
  EXPECT_FALSE(safe_copy(mapping.data(), source.data(), kBytes));
  EXPECT_FALSE(safe_copy(mapping.data(), source.data(), kBytes));
}

TEST_F(SafeCopy, ConcurrentFaultsOnSeveralThreads) {
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

// Fresh processes (threadsafe death tests re-run the binary), so each one
// installs iomm's handler over the action the test put in place. A child
// that spins on a fault the handler failed to pass on is ended by the alarm
// (SIGALRM), which the expectation then reports.
constexpr unsigned kSpinLimitSeconds = 10;

// volatile: set just before the faulting store, which must not overtake it.
char* volatile g_truncated = nullptr;

// A real fault: a store to a page past the end of a truncated memfd.
void touch_truncated_mapping_outside_safe_copy() {
  alarm(kSpinLimitSeconds);
  install_signal_handlers();
  ShrinkableMapping mapping;
  mapping.shrink();
  g_truncated = mapping.data();
  *static_cast<volatile char*>(mapping.data()) = 1;
  _exit(0);
}

void set_sigbus_handler(void (*handler)(int, siginfo_t*, void*)) {
  struct sigaction action {};
  action.sa_sigaction = handler;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_SIGINFO;
  if (sigaction(SIGBUS, &action, nullptr) != 0) _exit(4);
}

// Exit 7 if the fault reached us with its real siginfo, 8 otherwise.
extern "C" void exit_7_if_real_fault(int signo, siginfo_t* info, void* /*context*/) {
  const bool real = signo == SIGBUS && info->si_code == BUS_ADRERR &&
                    info->si_addr == static_cast<void*>(g_truncated);
  _exit(real ? 7 : 8);
}

TEST(SafeCopyDeathTest, FaultOutsideACopyWithDefaultActionKills) {
  const ScopedThreadsafeDeathTests threadsafe;
  EXPECT_EXIT(
      {
        std::signal(SIGBUS, SIG_DFL);
        touch_truncated_mapping_outside_safe_copy();
      },
      testing::KilledBySignal(SIGBUS), "");
}

TEST(SafeCopyDeathTest, FaultOutsideACopyWithIgnoredSigbusKillsInsteadOfSpinning) {
  // The kernel forces the default action on a fault it cannot ignore; the
  // handler used to return into the same fault forever.
  const ScopedThreadsafeDeathTests threadsafe;
  EXPECT_EXIT(
      {
        std::signal(SIGBUS, SIG_IGN);
        touch_truncated_mapping_outside_safe_copy();
      },
      testing::KilledBySignal(SIGBUS), "");
}

TEST(SafeCopyDeathTest, FaultOutsideACopyReachesThePreviousHandlerWithItsSiginfo) {
  const ScopedThreadsafeDeathTests threadsafe;
  EXPECT_EXIT(
      {
        set_sigbus_handler(exit_7_if_real_fault);
        install_signal_handlers();  // a second call must not chain us to ourselves
        touch_truncated_mapping_outside_safe_copy();
      },
      testing::ExitedWithCode(7), "");
}

// A fault inside a copy at an address outside its ranges: the copy reads a
// PROT_NONE page, and the SIGSEGV handler, running inside the copy, touches
// the truncated mapping. That SIGBUS is not the copy's and must reach the
// previous handler instead of failing the copy.
extern "C" void touch_truncated_on_sigsegv(int /*signo*/, siginfo_t* /*info*/, void* /*ctx*/) {
  // ThreadSanitizer runs handlers with every signal blocked, and a fault on
  // a blocked SIGBUS kills at once.
  sigset_t sigbus;
  sigemptyset(&sigbus);
  sigaddset(&sigbus, SIGBUS);
  pthread_sigmask(SIG_UNBLOCK, &sigbus, nullptr);
  *static_cast<volatile char*>(g_truncated) = 1;
  _exit(9);  // the store did not fault
}

void fault_inside_a_copy_outside_its_ranges() {
  alarm(kSpinLimitSeconds);
  install_signal_handlers();
  ShrinkableMapping mapping;
  mapping.shrink();
  g_truncated = mapping.data();
  struct sigaction action {};
  action.sa_sigaction = touch_truncated_on_sigsegv;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_SIGINFO;
  if (sigaction(SIGSEGV, &action, nullptr) != 0) _exit(4);
  void* guard = mmap(nullptr, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (guard == MAP_FAILED) _exit(4);
  char buf[16];
  _exit(safe_copy(buf, guard, sizeof(buf)) ? 5 : 3);
}

TEST(SafeCopyDeathTest, FaultInsideACopyOutsideItsRangesReachesThePreviousHandler) {
  const ScopedThreadsafeDeathTests threadsafe;
  EXPECT_EXIT(
      {
        set_sigbus_handler(exit_7_if_real_fault);
        fault_inside_a_copy_outside_its_ranges();
      },
      testing::ExitedWithCode(7), "");
}

TEST(SafeCopyDeathTest, SentSigbusIgnoredWhenPreviouslyIgnored) {
  const ScopedThreadsafeDeathTests threadsafe;
  // A sent SIGBUS (not a fault) while SIG_IGN was in place is ignored.
  EXPECT_EXIT(
      {
        std::signal(SIGBUS, SIG_IGN);
        install_signal_handlers();
        raise(SIGBUS);
        _exit(5);
      },
      testing::ExitedWithCode(5), "");
}

TEST(SafeCopyDeathTest, SentSigbusWithDefaultActionKills) {
  const ScopedThreadsafeDeathTests threadsafe;
  EXPECT_EXIT(
      {
        std::signal(SIGBUS, SIG_DFL);
        install_signal_handlers();
        raise(SIGBUS);
        _exit(5);
      },
      testing::KilledBySignal(SIGBUS), "");
}

bool sigbus_handler_installed() {
  struct sigaction current {};
  sigaction(SIGBUS, nullptr, &current);
  return (current.sa_flags & SA_SIGINFO) != 0;
}

TEST(SafeCopyDeathTest, FileSourceInstallsTheHandlerBeforeAnyCopy) {
  const ScopedThreadsafeDeathTests threadsafe;
  EXPECT_EXIT(
      {
        std::signal(SIGBUS, SIG_DFL);
        if (sigbus_handler_installed()) _exit(3);
        const int fd = memfd_create("iomm-install-test", 0);
        if (fd < 0 || ftruncate(fd, 4096) != 0) _exit(4);
        if (!MemorySource::from_file(fd, 0, 4096, FileSeal::allow_shrink).ok()) _exit(4);
        _exit(sigbus_handler_installed() ? 0 : 1);
      },
      testing::ExitedWithCode(0), "");
}

TEST(SafeCopyDeathTest, CopyWithoutTheHandlerIsAnInternalError) {
  const ScopedThreadsafeDeathTests threadsafe;
  EXPECT_DEATH(
      {
        char byte = 0;
        const char source = 1;
        safe_copy(&byte, &source, 1);
      },
      "install_signal_handlers");
}

// Machine checks are tested on the decision itself: producing a real one
// needs madvise(MADV_HWPOISON), which requires CAP_SYS_ADMIN and poisons a
// page of the host for good.
siginfo_t sigbus_info(int code, const void* address) {
  siginfo_t info{};
  info.si_signo = SIGBUS;
  info.si_code = code;
  info.si_addr = const_cast<void*>(address);
  return info;
}

TEST(SigbusDecision, RecoversOnlyVanishedPagesInsideTheCopysRanges) {
  // Two 64-byte ranges with gaps around them.
  char memory[4 * 64];
  const char* source = memory + 64;
  char* destination = memory + 3 * 64;
  const CopyWindow window{destination, source, 64};
  EXPECT_EQ(classify_sigbus(sigbus_info(BUS_ADRERR, source), &window), SigbusVerdict::recover);
  EXPECT_EQ(classify_sigbus(sigbus_info(BUS_ADRERR, source + 63), &window), SigbusVerdict::recover);
  EXPECT_EQ(classify_sigbus(sigbus_info(BUS_OBJERR, destination + 10), &window),
            SigbusVerdict::recover);
  // Just past either range, or no copy running.
  EXPECT_EQ(classify_sigbus(sigbus_info(BUS_ADRERR, source + 64), &window), SigbusVerdict::pass_on);
  EXPECT_EQ(classify_sigbus(sigbus_info(BUS_ADRERR, source - 1), &window), SigbusVerdict::pass_on);
  EXPECT_EQ(classify_sigbus(sigbus_info(BUS_ADRERR, destination + 64), &window),
            SigbusVerdict::pass_on);
  EXPECT_EQ(classify_sigbus(sigbus_info(BUS_ADRERR, source), nullptr), SigbusVerdict::pass_on);
  // Machine checks, alignment faults and sent signals, even inside the ranges.
  EXPECT_EQ(classify_sigbus(sigbus_info(BUS_MCEERR_AR, source), &window), SigbusVerdict::pass_on);
  EXPECT_EQ(classify_sigbus(sigbus_info(BUS_MCEERR_AO, destination), &window),
            SigbusVerdict::pass_on);
  EXPECT_EQ(classify_sigbus(sigbus_info(BUS_ADRALN, source), &window), SigbusVerdict::pass_on);
  EXPECT_EQ(classify_sigbus(sigbus_info(SI_USER, source), &window), SigbusVerdict::pass_on);
  EXPECT_EQ(classify_sigbus(sigbus_info(SI_TKILL, source), &window), SigbusVerdict::pass_on);
}

TEST(SigbusDecision, RecoversPoisonOnlyWhereTheCopyAskedForIt) {
  char memory[4 * 64];
  const char* source = memory + 64;
  char* destination = memory + 3 * 64;
  const CopyWindow revocable{destination, source, 64, Recover::vanished_or_poisoned};
  EXPECT_EQ(classify_sigbus(sigbus_info(BUS_MCEERR_AR, source), &revocable),
            SigbusVerdict::recover);
  EXPECT_EQ(classify_sigbus(sigbus_info(BUS_ADRERR, destination), &revocable),
            SigbusVerdict::recover);
  // Poison outside the ranges, or poison the copy did not touch.
  EXPECT_EQ(classify_sigbus(sigbus_info(BUS_MCEERR_AR, source + 64), &revocable),
            SigbusVerdict::pass_on);
  EXPECT_EQ(classify_sigbus(sigbus_info(BUS_MCEERR_AO, source), &revocable),
            SigbusVerdict::pass_on);
  EXPECT_EQ(classify_sigbus(sigbus_info(SI_USER, source), &revocable), SigbusVerdict::pass_on);
}

}  // namespace
}  // namespace iomm::mem
