// Grace periods (src/sync/rcu.cpp): rcu_synchronize() skips liburcu while no
// thread of the process has ever taken an RcuReadGuard, and must still wait
// for the reader that takes the first one.
#include "iomm/rcu.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <thread>

#include "sync/rcu.hpp"

namespace iomm {
namespace {

// Runs in a fresh process (a threadsafe death test re-executes the binary),
// where no guard was ever taken: the first reader's section must still hold
// off a grace period that starts while it is inside.
[[noreturn]] void first_reader_holds_off_the_grace_period() {
  std::atomic<bool> entered{false};
  std::atomic<bool> released{false};
  std::thread reader([&] {
    const RcuReadGuard guard;
    entered.store(true, std::memory_order_release);
    // Long enough that a grace period which does not wait returns first.
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    released.store(true, std::memory_order_release);
  });
  while (!entered.load(std::memory_order_acquire)) std::this_thread::yield();
  sync::rcu_synchronize();
  const bool waited = released.load(std::memory_order_acquire);
  reader.join();
  std::_Exit(waited ? 0 : 1);
}

TEST(Rcu, GracePeriodWaitsForTheFirstReaderEver) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(first_reader_holds_off_the_grace_period(), testing::ExitedWithCode(0), "");
}

TEST(Rcu, GracePeriodWithNoReaderReturns) {
  // Whatever ran before in this process, a grace period with no reader
  // inside a section ends.
  sync::rcu_synchronize();
  {
    const RcuReadGuard guard;
    EXPECT_TRUE(sync::in_read_section());
  }
  EXPECT_FALSE(sync::in_read_section());
  sync::rcu_synchronize();
}

}  // namespace
}  // namespace iomm
