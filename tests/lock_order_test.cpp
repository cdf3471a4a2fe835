// The debug lock-order checker (src/sync/ranked_mutex.hpp): taking a lock
// out of docs/design.md's order aborts naming both locks; the ranks follow
// the document's list.
#include <gtest/gtest.h>

#include <fstream>
#include <mutex>
#include <shared_mutex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "ioas/ioas_state.hpp"
#include "iomm/ioas.hpp"
#include "sync/ranked_mutex.hpp"

namespace iomm {
namespace {

using sync::LockRank;

#define IOMM_NEEDS_LOCK_CHECKS()                                                           \
  do {                                                                                     \
    if (!sync::kLockOrderChecks) {                                                         \
      GTEST_SKIP() << "lock-order checks are compiled only into debug builds (no NDEBUG)"; \
    }                                                                                      \
  } while (0)

TEST(LockOrderDeathTest, TakingTheTreeLockBeforeTheDomainsLockAborts) {
  IOMM_NEEDS_LOCK_CHECKS();
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto ioas = Ioas::create({}).value();
  ioas::IoasState& st = ioas::state_of(*ioas);
  EXPECT_DEATH(
      {
        std::shared_lock tree(st.tree_mu);
        std::shared_lock domains(st.domains_mu);
      },
      "lock order violation: acquiring IoasState::domains_mu \\(rank 60\\) while holding "
      "IoasState::tree_mu \\(rank 70\\)");
}

TEST(LockOrderDeathTest, SameRankTwiceAborts) {
  IOMM_NEEDS_LOCK_CHECKS();
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  sync::RankedMutex a{LockRank::pin_store, "first pin store"};
  sync::RankedMutex b{LockRank::pin_store, "second pin store"};
  EXPECT_DEATH(
      {
        std::lock_guard la(a);
        std::lock_guard lb(b);
      },
      "acquiring second pin store \\(rank 80\\) while holding first pin store");
}

TEST(LockOrder, InOrderTryLocksAndWaitsPass) {
  sync::RankedMutex outer{LockRank::ioas_accesses, "outer"};
  sync::RankedMutex inner{LockRank::access_pins, "inner"};
  {
    std::lock_guard lo(outer);
    std::lock_guard li(inner);
  }
  {
    // A try-lock out of order cannot deadlock: recorded, not checked.
    std::lock_guard li(inner);
    std::unique_lock lo(outer, std::try_to_lock);
    EXPECT_TRUE(lo.owns_lock());
  }
  // A condition wait releases and re-takes the lock under the record.
  sync::CondVar cv;
  std::unique_lock lk(inner);
  EXPECT_FALSE(cv.wait_until(lk, std::chrono::steady_clock::now(), [] { return false; }));
  EXPECT_TRUE(lk.owns_lock());
  lk.unlock();
  std::lock_guard again(outer);  // nothing is left recorded as held
}

// docs/design.md is the source of truth: every rank's lock appears in its
// "Lock order" section, in rank order.
TEST(LockOrder, RanksFollowTheDesignDocument) {
  std::ifstream in(std::string(IOMM_SOURCE_DIR) + "/docs/design.md");
  ASSERT_TRUE(in.good()) << "cannot read docs/design.md";
  std::stringstream text;
  text << in.rdbuf();
  const std::string doc = text.str();
  const size_t begin = doc.find("\n## Lock order\n");
  ASSERT_NE(begin, std::string::npos);
  const std::string section = doc.substr(begin, doc.find("\n## ", begin + 1) - begin);
  const std::vector<std::pair<LockRank, const char*>> ranks = {
      {LockRank::compat_unmap_notifier, "`UnmapNotifier::mu_`"},
      {LockRank::compat_container, "`compat::Container::mu`"},
      {LockRank::compat_group_link, "`iomm_vfio_group::link_mu`"},
      {LockRank::compat_fd_registry, "fd registry's `mu_`"},
      {LockRank::notifier_tree, "`notify::Registry::tree_mu_`"},
      {LockRank::ioas_accesses, "`IoasState::accesses_mu`"},
      {LockRank::access_pins, "`AccessState::mu`"},
      {LockRank::access_pages, "`AccessState::page_mu`"},
      {LockRank::ioas_domains, "`IoasState::domains_mu`"},
      {LockRank::ioas_tree, "`IoasState::tree_mu`"},
      {LockRank::on_demand_fill, "`ioas::OnDemand::mu`"},
      {LockRank::pin_store, "`MemObject::mu_`"},
      {LockRank::page_table_structure, "`structure_mu_`"},
      {LockRank::file_registry, "file registry's mutex"},
      {LockRank::file_window, "`FileObject::window_mu_`"},
      {LockRank::user_object, "`UserObject::mu_`"},
      {LockRank::compat_calls, "`Container::calls_mu_`"},
      {LockRank::ioas_flight, "`IoasState::flight_mu`"},
      {LockRank::owner_ledger, "ledger's mutex"},
      {LockRank::owner_source, "`source_mu_`"},
      {LockRank::fault_log, "fault log"},
      {LockRank::notifier_seq, "`notify::Registry::seq_mu_`"},
      {LockRank::notifier_node, "`notify::Node::mu`"},
      {LockRank::iotlb_caches, "`domain::Iotlb::mu_`"},
      {LockRank::table_pool, "`TablePool::mu_`"},
  };
  size_t last_pos = 0;
  LockRank last_rank = LockRank::compat_unmap_notifier;
  for (const auto& [rank, name] : ranks) {
    const size_t pos = section.find(name);
    ASSERT_NE(pos, std::string::npos) << name << " is not in the Lock order section";
    EXPECT_GE(pos, last_pos) << name << " comes before the previous lock in the document";
    EXPECT_GE(rank, last_rank) << name << " ranks below the previous lock";
    last_pos = pos;
    last_rank = rank;
  }
}

}  // namespace
}  // namespace iomm
