// The shared counter block: what another process sees through /proc/<pid>/fd
// matches iomm::counters(), while pins are held and after they are released.
#include "stats/shared_counters.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <string>

#include "iomm/accounting.hpp"
#include "iomm/domain.hpp"
#include "iomm/ioas.hpp"
#include "iomm/source.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

using stats::SharedCounters;

constexpr uint32_t kReadWrite = kProtRead | kProtWrite;

// The counter memfd among this process's fds, found the way a monitor finds
// it, or an empty path.
std::filesystem::path find_counters_fd() {
  const std::string target = std::string("/memfd:") + stats::kCountersMemfdName + " (deleted)";
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    if (std::filesystem::read_symlink(entry.path(), ec).string() == target) return entry.path();
  }
  return {};
}

// A read-only view of the counter block through /proc, as `iomm stat` maps it.
class ForeignView {
 public:
  ForeignView() {
    const std::filesystem::path fd_path = find_counters_fd();
    if (fd_path.empty()) return;
    const int fd = open(fd_path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    struct stat st {};
    fstat(fd, &st);
    inode_ = st.st_ino;
    void* addr = mmap(nullptr, stats::kCountersBytes, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (addr != MAP_FAILED) block_ = static_cast<const SharedCounters*>(addr);
  }
  ~ForeignView() {
    if (block_ != nullptr) munmap(const_cast<SharedCounters*>(block_), stats::kCountersBytes);
  }
  ForeignView(const ForeignView&) = delete;
  ForeignView& operator=(const ForeignView&) = delete;

  [[nodiscard]] const SharedCounters* block() const { return block_; }
  [[nodiscard]] ino_t inode() const { return inode_; }

  // The charge slot of (mode, id), or nullptr.
  [[nodiscard]] const stats::OwnerSlot* owner(stats::SlotMode mode, int id) const {
    for (const auto& slot : block_->owners) {
      if (slot.mode.load() == mode && slot.id.load() == id) return &slot;
    }
    return nullptr;
  }

 private:
  const SharedCounters* block_ = nullptr;
  ino_t inode_ = 0;
};

std::shared_ptr<SoftDomain> make_domain() {
  auto domain = SoftDomain::create({});
  EXPECT_TRUE(domain.ok());
  return std::move(domain).value();
}

TEST(SharedCounters, MonitorSeesPinsAndChargesThenZero) {
  // Without CAP_IPC_LOCK the pins are charged, so the owner slot moves too.
  test::WithoutIpcLock no_ipc_lock;
  constexpr uint64_t kLimit = 256ULL << 20;
  ASSERT_OK(set_memlock_limit(AccountMode::per_process, 0, kLimit));

  constexpr uint64_t kFileBytes = 1 << 20;
  constexpr uint64_t kSimulatedBytes = 64ULL << 20;
  test::Memfd memfd(kFileBytes);
  auto file = MemorySource::from_file(memfd.fd(), 0, kFileBytes);
  auto simulated = MemorySource::simulated(kSimulatedBytes);
  ASSERT_OK(file);
  ASSERT_OK(simulated);
  auto ioas = Ioas::create();
  ASSERT_OK(ioas);
  ASSERT_OK((*ioas)->map(*file, kReadWrite));
  ASSERT_OK((*ioas)->map(*simulated, kReadWrite));
  auto domain = make_domain();
  ASSERT_OK((*ioas)->attach(domain));

  ForeignView view;
  ASSERT_NE(view.block(), nullptr) << "no iomm-counters memfd in /proc/self/fd";
  const SharedCounters& block = *view.block();
  EXPECT_EQ(block.magic.load(), stats::kCountersMagic);
  EXPECT_EQ(block.version.load(), stats::kCountersVersion);
  EXPECT_EQ(block.pid.load(), getpid());

  const Counters c = counters();
  EXPECT_EQ(c.pinned_bytes, kFileBytes);
  EXPECT_EQ(c.simulated_pinned_bytes, kSimulatedBytes);
  EXPECT_EQ(block.pinned_pages.load() * kPageSize, c.pinned_bytes);
  EXPECT_EQ(block.simulated_pinned_pages.load() * kPageSize, c.simulated_pinned_bytes);

  const stats::OwnerSlot* slot = view.owner(stats::kSlotPerProcess, getpid());
  ASSERT_NE(slot, nullptr);
  ASSERT_EQ(c.owners.size(), 1U);
  EXPECT_EQ(c.owners[0].charged_bytes, kFileBytes + kSimulatedBytes);
  EXPECT_EQ(slot->charged_pages.load() * kPageSize, c.owners[0].charged_bytes);
  EXPECT_EQ(slot->limit_pages.load() * kPageSize, kLimit);

  ASSERT_OK((*ioas)->detach(domain));
  ASSERT_OK((*ioas)->unmap_all());
  EXPECT_EQ(block.pinned_pages.load(), 0U);
  EXPECT_EQ(block.simulated_pinned_pages.load(), 0U);
  EXPECT_EQ(slot->charged_pages.load(), 0U);
  ASSERT_OK(set_memlock_limit(AccountMode::per_process, 0, std::nullopt));
}

TEST(SharedCounters, ForkedChildCountsInItsOwnBlock) {
  SharedCounters& mine = stats::shared_counters();
  mine.simulated_pinned_pages.fetch_add(7);
  const ForeignView before;
  ASSERT_NE(before.block(), nullptr);

  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // The child starts from the parent's values in a memfd of its own.
    const ForeignView view;
    const bool own_block = view.block() != nullptr && view.inode() != before.inode() &&
                           view.block()->pid.load() == getpid() &&
                           view.block()->simulated_pinned_pages.load() == 7;
    stats::shared_counters().simulated_pinned_pages.fetch_add(100);
    _exit(own_block ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  EXPECT_EQ(mine.simulated_pinned_pages.load(), 7U) << "the child's count reached the parent";
  EXPECT_EQ(before.block()->pid.load(), getpid());
  mine.simulated_pinned_pages.fetch_sub(7);
}

TEST(SharedCounters, OwnersPastTheTableStillCount) {
  // Exhaust the table with per-user slots nobody charges.
  for (size_t i = 0; i < stats::kOwnerSlots; ++i) {
    stats::owner_charge_slot(AccountMode::per_user, 100000 + static_cast<int>(i));
  }
  std::atomic<uint64_t>& overflow = stats::owner_charge_slot(AccountMode::per_process, 424242);
  const SharedCounters& block = stats::shared_counters();
  for (const auto& slot : block.owners) {
    EXPECT_NE(&slot.charged_pages, &overflow);
    EXPECT_NE(slot.id.load(), 424242);
  }
  overflow.fetch_add(3);
  EXPECT_EQ(overflow.load(), 3U);
  stats::publish_owner_limit(overflow, 10);  // not in the table: ignored
  for (const auto& slot : block.owners) EXPECT_NE(slot.limit_pages.load(), 10U);
}

}  // namespace
}  // namespace iomm
