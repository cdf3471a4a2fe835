// Test entry point. After every test, the process must be back to a clean
// state: no pinned pages, no charge, nothing mlocked (VmLck). ctest runs each
// test in its own process, so these counters start at zero.
#include <gtest/gtest.h>

#include "iomm/accounting.hpp"

namespace {

class CleanStateCheck : public testing::EmptyTestEventListener {
  void OnTestEnd(const testing::TestInfo& info) override {
    if (info.result()->Skipped()) return;
    const iomm::Counters c = iomm::counters();
    EXPECT_EQ(c.pinned_bytes, 0U) << "pages still pinned after " << info.name();
    EXPECT_EQ(c.simulated_pinned_bytes, 0U) << "simulated pages still pinned";
    EXPECT_EQ(c.charged_bytes, 0U) << "memlock charge left after " << info.name();
    EXPECT_EQ(c.vmlck_bytes, 0U) << "VmLck not zero after " << info.name();
  }
};

}  // namespace

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  testing::UnitTest::GetInstance()->listeners().Append(new CleanStateCheck);
  return RUN_ALL_TESTS();
}
