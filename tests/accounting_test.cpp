// Accounting (seed 000): charge before pin, never over the limit, unwind on
// failure, once per owner and page however the page is reached.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>

#include <atomic>
#include <thread>
#include <vector>

#include "acct/owner.hpp"
#include "iomm/access.hpp"
#include "iomm/ioas.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

constexpr uint32_t kRW = kProtRead | kProtWrite;
constexpr uint64_t kMiB = 1 << 20;

using test::Memfd;
using test::WithoutIpcLock;

std::shared_ptr<Ioas> make_ioas(AccountMode mode = AccountMode::per_process) {
  IoasOptions o;
  o.account_mode = mode;
  return Ioas::create(o).value();
}

std::shared_ptr<SoftDomain> make_domain() { return SoftDomain::create({}).value(); }

uint64_t charged() { return counters().charged_bytes; }

TEST(Accounting, ChargedWhenPinnedNotWhenMapped) {
  WithoutIpcLock nocap;
  ASSERT_OK(set_memlock_limit(AccountMode::per_process, 0, 64 * kMiB));
  Memfd mfd(4 * kMiB);
  auto ioas = make_ioas();
  auto src = MemorySource::from_file(mfd.fd(), 0, 4 * kMiB);
  ASSERT_OK(src);
  ASSERT_OK(ioas->map(*src, kRW, 0x100000));
  EXPECT_EQ(charged(), 0U);
  EXPECT_EQ(counters().pinned_bytes, 0U);
  auto d = make_domain();
  ASSERT_OK(ioas->attach(d));
  EXPECT_EQ(charged(), 4 * kMiB);
  EXPECT_EQ(counters().pinned_bytes, 4 * kMiB);
  EXPECT_EQ(process_vmlck_bytes(), 4 * kMiB);
  const Counters c = counters();
  ASSERT_EQ(c.owners.size(), 1U);
  EXPECT_EQ(c.owners[0].mode, AccountMode::per_process);
  EXPECT_EQ(c.owners[0].id, getpid());
  EXPECT_EQ(c.owners[0].limit_bytes, 64 * kMiB);
  ASSERT_OK(ioas->unmap_all());
  EXPECT_EQ(charged(), 0U);
  ASSERT_OK(ioas->detach(d));
}

TEST(Accounting, LimitBitesWithStateUnchanged) {
  WithoutIpcLock nocap;
  ASSERT_OK(set_memlock_limit(AccountMode::per_process, 0, 3 * kMiB));
  Memfd mfd(8 * kMiB);
  auto ioas = make_ioas();
  auto d = make_domain();
  ASSERT_OK(ioas->attach(d));
  auto two = MemorySource::from_file(mfd.fd(), 0, 2 * kMiB);
  auto other_two = MemorySource::from_file(mfd.fd(), 2 * kMiB, 2 * kMiB);
  ASSERT_OK(ioas->map(*two, kRW, 0x200000));
  EXPECT_EQ(charged(), 2 * kMiB);
  const uint64_t vmlck = process_vmlck_bytes();
  EXPECT_ERRNO(ioas->map(*other_two, kRW, 0x800000), ENOMEM);
  EXPECT_EQ(charged(), 2 * kMiB);
  EXPECT_EQ(counters().pinned_bytes, 2 * kMiB);
  EXPECT_EQ(process_vmlck_bytes(), vmlck);
  EXPECT_EQ(ioas->counters().mappings, 1U);
  EXPECT_ERRNO(d->translate(0x800000, kProtRead), EFAULT);
  // Exactly at the limit is fine.
  auto one = MemorySource::from_file(mfd.fd(), 4 * kMiB, kMiB);
  ASSERT_OK(ioas->map(*one, kRW, 0x800000));
  EXPECT_EQ(charged(), 3 * kMiB);
  auto page = MemorySource::from_file(mfd.fd(), 5 * kMiB, kPageSize);
  EXPECT_ERRNO(ioas->map(*page, kRW, 0x900000), ENOMEM);
  ASSERT_OK(ioas->unmap_all());
  ASSERT_OK(ioas->detach(d));
}

TEST(Accounting, AttachOverTheLimitUnwinds) {
  WithoutIpcLock nocap;
  ASSERT_OK(set_memlock_limit(AccountMode::per_process, 0, 3 * kMiB));
  Memfd mfd(4 * kMiB);
  auto ioas = make_ioas();
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, 2 * kMiB), kRW, 0x200000));
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 2 * kMiB, 2 * kMiB), kRW, 0x400000));
  auto d = make_domain();
  EXPECT_ERRNO(ioas->attach(d), ENOMEM);
  EXPECT_EQ(charged(), 0U);
  EXPECT_EQ(counters().pinned_bytes, 0U);
  EXPECT_EQ(process_vmlck_bytes(), 0U);
  EXPECT_EQ(ioas->counters().domains, 0U);
  EXPECT_ERRNO(d->translate(0x200000, kProtRead), EFAULT);
}

TEST(Accounting, RlimitIsTheDefaultLimit) {
  WithoutIpcLock nocap;
  struct rlimit lim {};
  ASSERT_EQ(getrlimit(RLIMIT_MEMLOCK, &lim), 0);
  const struct rlimit small {
    2 * kMiB, lim.rlim_max == RLIM_INFINITY ? RLIM_INFINITY : lim.rlim_max
  };
  ASSERT_EQ(setrlimit(RLIMIT_MEMLOCK, &small), 0);
  Memfd mfd(4 * kMiB);
  auto ioas = make_ioas();
  auto d = make_domain();
  ASSERT_OK(ioas->attach(d));
  EXPECT_ERRNO(ioas->map(*MemorySource::from_file(mfd.fd(), 0, 3 * kMiB), kRW, 0x400000), ENOMEM);
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, kMiB), kRW, 0x400000));
  ASSERT_OK(ioas->unmap_all());
  ASSERT_OK(ioas->detach(d));
  ASSERT_EQ(setrlimit(RLIMIT_MEMLOCK, &lim), 0);
}

TEST(Accounting, CapIpcLockAtMapTimeBypassesTheCharge) {
  IOMM_NEEDS_ROOT("maps made while holding CAP_IPC_LOCK, which only root has here");
  ASSERT_OK(set_memlock_limit(AccountMode::per_process, 0, kMiB));
  Memfd mfd(4 * kMiB);
  auto ioas = make_ioas();
  auto d = make_domain();
  ASSERT_OK(ioas->attach(d));
  // As root this thread holds CAP_IPC_LOCK: pinned, not charged.
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, 2 * kMiB), kRW, 0x200000));
  EXPECT_EQ(counters().pinned_bytes, 2 * kMiB);
  EXPECT_EQ(charged(), 0U);
  {
    // The capability is captured at map time: dropping it later changes
    // nothing for that mapping, but a new one is charged.
    WithoutIpcLock nocap;
    EXPECT_ERRNO(ioas->map(*MemorySource::from_file(mfd.fd(), 2 * kMiB, 2 * kMiB), kRW, 0x400000),
                 ENOMEM);
    ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 2 * kMiB, kMiB), kRW, 0x400000));
    EXPECT_EQ(charged(), kMiB);
  }
  ASSERT_OK(ioas->unmap_all());
  ASSERT_OK(ioas->detach(d));
}

TEST(Accounting, ModeNoneAndPerUser) {
  WithoutIpcLock nocap;
  ASSERT_OK(set_memlock_limit(AccountMode::per_user, 0, 8 * kMiB));
  EXPECT_ERRNO(set_memlock_limit(AccountMode::none, 0, kMiB), EINVAL);
  Memfd mfd(4 * kMiB);
  auto none = make_ioas(AccountMode::none);
  auto user = make_ioas(AccountMode::per_user);
  auto d1 = make_domain();
  auto d2 = make_domain();
  ASSERT_OK(none->attach(d1));
  ASSERT_OK(user->attach(d2));
  ASSERT_OK(none->map(*MemorySource::from_file(mfd.fd(), 0, 2 * kMiB), kRW, 0x200000));
  EXPECT_EQ(charged(), 0U);
  ASSERT_OK(user->map(*MemorySource::from_file(mfd.fd(), 2 * kMiB, 2 * kMiB), kRW, 0x200000));
  const Counters c = counters();
  EXPECT_EQ(c.charged_bytes, 2 * kMiB);
  int charged_owners = 0;
  for (const OwnerCounters& o : c.owners) {
    if (o.charged_bytes == 0) continue;
    ++charged_owners;
    EXPECT_EQ(o.mode, AccountMode::per_user);
    EXPECT_EQ(o.id, static_cast<int>(getuid()));
  }
  EXPECT_EQ(charged_owners, 1);
  ASSERT_OK(none->unmap_all());
  ASSERT_OK(user->unmap_all());
  ASSERT_OK(none->detach(d1));
  ASSERT_OK(user->detach(d2));
}

TEST(Accounting, SameMemfdRangeMappedTwiceIsChargedOnce) {
  WithoutIpcLock nocap;
  ASSERT_OK(set_memlock_limit(AccountMode::per_process, 0, 3 * kMiB));
  Memfd mfd(4 * kMiB);
  auto ioas = make_ioas();
  auto d = make_domain();
  ASSERT_OK(ioas->attach(d));
  auto src = MemorySource::from_file(mfd.fd(), 0, 2 * kMiB);
  ASSERT_OK(ioas->map(*src, kRW, 0x200000));
  // A second map, and a third through another fd of the same file, overlapping.
  ASSERT_OK(ioas->map(*src, kRW, 0x800000));
  const int fd2 = dup(mfd.fd());
  ASSERT_OK(ioas->map(*MemorySource::from_file(fd2, kMiB, kMiB), kProtRead, 0x1000000));
  close(fd2);
  EXPECT_EQ(charged(), 2 * kMiB);
  EXPECT_EQ(counters().pinned_bytes, 2 * kMiB);
  EXPECT_EQ(process_vmlck_bytes(), 2 * kMiB);
  // A second address space reaching the same pages is not charged again.
  auto other = make_ioas();
  auto d2 = make_domain();
  ASSERT_OK(other->attach(d2));
  ASSERT_OK(other->map(*src, kRW, 0x200000));
  EXPECT_EQ(charged(), 2 * kMiB);
  // Releasing one user keeps the pages pinned for the others.
  ASSERT_OK(ioas->unmap(0x200000, 2 * kMiB));
  EXPECT_EQ(charged(), 2 * kMiB);
  ASSERT_OK(ioas->unmap_all());
  EXPECT_EQ(charged(), 2 * kMiB);
  ASSERT_OK(other->unmap_all());
  EXPECT_EQ(charged(), 0U);
  EXPECT_EQ(process_vmlck_bytes(), 0U);
  ASSERT_OK(ioas->detach(d));
  ASSERT_OK(other->detach(d2));
}

TEST(Accounting, SameUserMemoryMappedTwiceIsChargedOnce) {
  WithoutIpcLock nocap;
  ASSERT_OK(set_memlock_limit(AccountMode::per_process, 0, 64 * kMiB));
  void* buf = mmap(nullptr, kMiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(buf, MAP_FAILED);
  auto ioas = make_ioas();
  auto d = make_domain();
  ASSERT_OK(ioas->attach(d));
  ASSERT_OK(ioas->map(*MemorySource::from_user(buf, kMiB), kRW, 0x100000));
  ASSERT_OK(ioas->map(*MemorySource::from_user(static_cast<char*>(buf) + kPageSize, kPageSize), kRW,
                      0x400000));
  EXPECT_EQ(charged(), kMiB);
  EXPECT_EQ(process_vmlck_bytes(), kMiB);
  ASSERT_OK(ioas->unmap(0x100000, kMiB));
  // The single page still mapped stays locked.
  EXPECT_EQ(charged(), kPageSize);
  EXPECT_EQ(process_vmlck_bytes(), kPageSize);
  ASSERT_OK(ioas->unmap_all());
  ASSERT_OK(ioas->detach(d));
  munmap(buf, kMiB);
}

TEST(Accounting, CopyAddsNoPinAndNoCharge) {
  WithoutIpcLock nocap;
  ASSERT_OK(set_memlock_limit(AccountMode::per_process, 0, 2 * kMiB));
  Memfd mfd(2 * kMiB);
  auto src_ioas = make_ioas();
  auto dst_ioas = make_ioas();
  auto d1 = make_domain();
  auto d2 = make_domain();
  ASSERT_OK(src_ioas->attach(d1));
  ASSERT_OK(dst_ioas->attach(d2));
  ASSERT_OK(src_ioas->map(*MemorySource::from_file(mfd.fd(), 0, kMiB), kRW, 0x100000));
  ASSERT_OK(src_ioas->map(*MemorySource::from_file(mfd.fd(), kMiB, kMiB), kRW, 0x200000));
  EXPECT_EQ(charged(), 2 * kMiB);  // at the limit: any new charge would fail
  auto iova = dst_ioas->copy_from(*src_ioas, 0x180000, kMiB, kRW);
  ASSERT_OK(iova);
  EXPECT_EQ(charged(), 2 * kMiB);
  EXPECT_EQ(counters().pinned_bytes, 2 * kMiB);
  EXPECT_EQ(dst_ioas->counters().mappings, 2U);  // one per source mapping crossed
  // The copy reaches the same memory.
  std::vector<char> pattern(64, 'q');
  ASSERT_OK(d1->dma_write(0x1FFFE0, pattern.data(), pattern.size()));
  std::vector<char> back(64);
  ASSERT_OK(d2->dma_read(*iova + 0x7FFE0, back.data(), back.size()));
  EXPECT_EQ(back, pattern);
  // Source gone: the copy keeps the pages (and the charge).
  ASSERT_OK(src_ioas->unmap_all());
  EXPECT_EQ(charged(), kMiB);
  ASSERT_OK(dst_ioas->unmap_all());
  EXPECT_EQ(charged(), 0U);
  ASSERT_OK(src_ioas->detach(d1));
  ASSERT_OK(dst_ioas->detach(d2));
}

TEST(Accounting, CopyErrors) {
  auto a = make_ioas();
  auto b = make_ioas();
  int ro_buf[1024] = {};
  ASSERT_OK(a->map(*MemorySource::simulated(2 * kPageSize), kRW, 0x10000));
  ASSERT_OK(a->map(*MemorySource::simulated(2 * kPageSize), kRW, 0x13000));  // hole at 0x12000
  ASSERT_OK(a->map(*MemorySource::from_user(ro_buf, sizeof(ro_buf), false), kProtRead, 0x40000));
  EXPECT_ERRNO(b->copy_from(*a, 0x10000, 4 * kPageSize, kRW), ENOENT);
  EXPECT_ERRNO(b->copy_from(*a, 0x20000, kPageSize, kRW), ENOENT);
  EXPECT_ERRNO(b->copy_from(*a, 0x10000, 0, kRW), EINVAL);
  EXPECT_ERRNO(b->copy_from(*a, 0x10000, kPageSize, 0), EINVAL);
  EXPECT_ERRNO(b->copy_from(*a, UINT64_MAX - 10, 100, kRW), EOVERFLOW);
  EXPECT_ERRNO(b->copy_from(*a, 0x40000, sizeof(ro_buf), kRW), EPERM);
  ASSERT_OK(b->copy_from(*a, 0x40000, sizeof(ro_buf), kProtRead, 0x40000));
  EXPECT_ERRNO(b->copy_from(*a, 0x10000, kPageSize, kRW, 0x40000), EEXIST);
  EXPECT_EQ(b->counters().mappings, 1U);
}

TEST(Accounting, ConcurrentChargesNeverExceedTheLimit) {
  constexpr int kThreads = 4;
  constexpr int kPerThread = 8;
  // Below the kernel's default RLIMIT_MEMLOCK (8 MiB), which also applies
  // to the mlock itself once CAP_IPC_LOCK is dropped.
  constexpr uint64_t kLimit = 6 * kMiB;
  ASSERT_OK(set_memlock_limit(AccountMode::per_process, 0, kLimit));
  Memfd mfd(kThreads * kPerThread * kMiB);
  auto ioas = make_ioas();
  auto d = make_domain();
  ASSERT_OK(ioas->attach(d));
  std::atomic<int> successes{0};
  std::atomic<uint64_t> max_seen{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      WithoutIpcLock nocap;
      for (int i = 0; i < kPerThread; ++i) {
        const uint64_t off = (t * kPerThread + i) * kMiB;
        auto r = ioas->map(*MemorySource::from_file(mfd.fd(), off, kMiB), kRW, 0x10000000 + off);
        if (r.ok()) {
          successes.fetch_add(1);
        } else {
          EXPECT_EQ(r.code(), ENOMEM);
        }
        uint64_t now = counters().charged_bytes;
        uint64_t prev = max_seen.load();
        while (now > prev && !max_seen.compare_exchange_weak(prev, now)) {
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(successes.load(), 6);
  EXPECT_EQ(charged(), kLimit);
  EXPECT_LE(max_seen.load(), kLimit);
  ASSERT_OK(ioas->unmap_all());
  ASSERT_OK(ioas->detach(d));
}

// A child process that waits until it is killed.
class Child {
 public:
  Child() {
    pid_ = fork();
    if (pid_ == 0) {
      for (;;) pause();
    }
  }
  ~Child() { reap(); }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  [[nodiscard]] int pid() const { return pid_; }
  void reap() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  int pid_;
};

TEST(AccountingOwners, PerUserLimitOutlivesTheProcessItCameFrom) {
  WithoutIpcLock nocap;
  ASSERT_OK(set_memlock_limit(AccountMode::per_user, 0, std::nullopt));
  Child child;
  ASSERT_GT(child.pid(), 0);
  struct rlimit lim {};
  ASSERT_EQ(prlimit(child.pid(), RLIMIT_MEMLOCK, nullptr, &lim), 0);
  lim.rlim_cur = kMiB;
  ASSERT_EQ(prlimit(child.pid(), RLIMIT_MEMLOCK, &lim, nullptr), 0);
  Memfd mfd(2 * kMiB);
  auto ioas = make_ioas(AccountMode::per_user);
  // Mapped on behalf of the child: its RLIMIT_MEMLOCK (1 MiB) is the limit.
  const OwnerSpec as_child{.pid = child.pid()};
  ASSERT_OK(ioas->map_as(*MemorySource::from_file(mfd.fd(), 0, kMiB / 2), kRW, 0x100000, as_child));
  ASSERT_OK(ioas->map_as(*MemorySource::from_file(mfd.fd(), kMiB, kMiB), kRW, 0x200000, as_child));
  child.reap();
  // The child is gone; its limit is the one it last had, not 0.
  auto d = make_domain();
  EXPECT_ERRNO(ioas->attach(d), ENOMEM);  // 1.5 MiB over its 1 MiB
  EXPECT_EQ(charged(), 0U);
  ASSERT_OK(ioas->unmap(0x200000, kMiB));
  ASSERT_OK(ioas->attach(d));
  EXPECT_EQ(charged(), kMiB / 2);
  ASSERT_OK(ioas->unmap_all());
  ASSERT_OK(ioas->detach(d));
}

TEST(AccountingOwners, PerUserLimitComesFromTheLatestMappingProcess) {
  WithoutIpcLock nocap;
  ASSERT_OK(set_memlock_limit(AccountMode::per_user, 0, std::nullopt));
  Child child;
  struct rlimit lim {};
  ASSERT_EQ(prlimit(child.pid(), RLIMIT_MEMLOCK, nullptr, &lim), 0);
  lim.rlim_cur = 0;
  ASSERT_EQ(prlimit(child.pid(), RLIMIT_MEMLOCK, &lim, nullptr), 0);
  Memfd mfd(kMiB);
  auto ioas = make_ioas(AccountMode::per_user);
  auto d = make_domain();
  ASSERT_OK(ioas->attach(d));
  EXPECT_ERRNO(ioas->map_as(*MemorySource::from_file(mfd.fd(), 0, kPageSize), kRW, 0x100000,
                            OwnerSpec{.pid = child.pid()}),
               ENOMEM);
  // This process maps next: its own limit applies again.
  ASSERT_OK(ioas->map(*MemorySource::from_file(mfd.fd(), 0, kPageSize), kRW, 0x100000));
  EXPECT_EQ(charged(), kPageSize);
  ASSERT_OK(ioas->unmap_all());
  ASSERT_OK(ioas->detach(d));
}

TEST(AccountingOwners, AnExitedProcessCannotBeNamedAsOwner) {
  int gone = 0;
  {
    Child child;
    gone = child.pid();
  }
  auto ioas = make_ioas(AccountMode::per_process);
  WithoutIpcLock nocap;
  EXPECT_ERRNO(
      ioas->map_as(*MemorySource::simulated(kPageSize), kRW, 0x100000, OwnerSpec{.pid = gone}),
      ESRCH);
  EXPECT_ERRNO(set_memlock_limit(AccountMode::per_process, gone, kMiB), ESRCH);
  EXPECT_EQ(ioas->counters().mappings, 0U);
}

TEST(AccountingOwners, AReusedPidIsANewOwner) {
  // The same pid with another start time is another process: it does not
  // see the charges or the configured limit of the one before.
  const auto self = acct::process_id(0);
  ASSERT_OK(self);
  const int pid = static_cast<int>(getpid());
  auto before = acct::ledger_owner(AccountMode::per_process, pid, *self, true);
  ASSERT_OK(before);
  const acct::ProcessId reused{pid, self->start_time + 1};
  auto after = acct::ledger_owner(AccountMode::per_process, pid, reused, true);
  ASSERT_OK(after);
  EXPECT_NE(before->get(), after->get());
  ASSERT_OK((*before)->charge(3));
  EXPECT_EQ((*after)->charged_pages(), 0U);
  (*before)->uncharge(3);
  // The same process is found again.
  auto again = acct::ledger_owner(AccountMode::per_process, pid, *self, true);
  ASSERT_OK(again);
  EXPECT_EQ(before->get(), again->get());
  // Its pid now answers for another process, whose limit is not its own:
  // an owner that never read a limit of its own has none.
  EXPECT_EQ((*after)->limit_pages(), std::optional<uint64_t>(0));
}

}  // namespace
}  // namespace iomm
