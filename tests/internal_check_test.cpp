// Internal consistency checks must abort in every build the tests run,
// including RelWithDebInfo, where assert() is compiled out.
#include <gtest/gtest.h>

#include "acct/owner.hpp"
#include "mem/interval_counts.hpp"

namespace {

TEST(InternalCheckDeathTest, ChargeUnderflowAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        iomm::acct::Owner owner(iomm::AccountMode::per_process, 999999, iomm::acct::ProcessId{});
        owner.uncharge(1);
      },
      "internal check failed.*charge underflow");
}

TEST(InternalCheckDeathTest, PinCountUnderflowAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        iomm::mem::IntervalCounts counts;
        counts.cover(0, 7);
        counts.add(0, 7, -1, 0);
      },
      "internal check failed.*pin count underflow");
}

}  // namespace
