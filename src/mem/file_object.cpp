#include "mem/file_object.hpp"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/errno_text.hpp"
#include "mem/populate.hpp"
#include "mem/safe_copy.hpp"
#include "mem/sys.hpp"
#include "sync/ranked_mutex.hpp"

namespace iomm::mem {

namespace {

constexpr uint64_t kWindowAlign = 1ULL << 30;

struct FileRegistry {
  sync::RankedMutex mu{sync::LockRank::file_registry, "file registry mu"};
  std::map<std::pair<dev_t, ino_t>, std::weak_ptr<FileObject>> files;
};

FileRegistry& registry() {
  static auto* instance = new FileRegistry();  // outlives static destruction
  return *instance;
}

uint64_t round_up(uint64_t v, uint64_t align) { return (v + align - 1) & ~(align - 1); }

Error sys_error(int code, const std::string& what) {
  return Error(code, what + ": " + errno_text(errno));
}

}  // namespace

FileObject::FileObject(unsigned page_shift, int fd, dev_t dev, ino_t ino, std::byte* base,
                       uint64_t window, uint64_t mapped, bool writable, bool shrink_sealed)
    : MemObject(SourceKind::file, page_shift),
      dev_(dev),
      ino_(ino),
      base_(base),
      window_(window),
      fd_(fd),
      mapped_(mapped),
      writable_(writable),
      shrink_sealed_(shrink_sealed) {}

FileObject::~FileObject() {
  munmap(base_, window_);
  close(fd_);
  FileRegistry& reg = registry();
  std::lock_guard lk(reg.mu);
  auto it = reg.files.find({dev_, ino_});
  if (it != reg.files.end() && it->second.expired()) reg.files.erase(it);
}

Result<FileObject::Range> FileObject::for_range(int fd, uint64_t offset, uint64_t length,
                                                FileSeal seal) {
  if (length == 0) return Error(EINVAL, "zero length");
  uint64_t end = 0;
  if (__builtin_add_overflow(offset, length, &end)) {
    return Error(EOVERFLOW, "offset + length overflows");
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) return sys_error(EBADF, "fstat of fd " + std::to_string(fd));
  if (!S_ISREG(st.st_mode)) {
    return Error(ENODEV,
                 "fd " + std::to_string(fd) + " is not a regular file and cannot be mapped shared");
  }
  const int access = fcntl(fd, F_GETFL) & O_ACCMODE;
  if (access == O_WRONLY) return Error(ENODEV, "a write-only fd cannot be mapped");
  unsigned page_shift = kPageShift;
  struct statfs fs {};
  if (fstatfs(fd, &fs) == 0 && fs.f_type == HUGETLBFS_MAGIC) {
    page_shift = static_cast<unsigned>(__builtin_ctzll(static_cast<uint64_t>(fs.f_bsize)));
  }
  // A hugetlb range need not be aligned to the huge page size: pins cover
  // (and charge) whole huge pages, and domains map the range with smaller
  // leaves where its ends are not aligned.
  if (end > static_cast<uint64_t>(st.st_size)) {
    return Error(EINVAL, "range ends at " + std::to_string(end) + ", past the end of the file (" +
                             std::to_string(st.st_size) + " bytes)");
  }
  // Files that cannot be sealed (tmpfs files not made by memfd_create) say
  // EINVAL: they carry no seals.
  const int seals = std::max(fcntl(fd, F_GET_SEALS), 0);
  constexpr int kWriteSeals = F_SEAL_WRITE | F_SEAL_FUTURE_WRITE;
  if (seal == FileSeal::shrink && (seals & F_SEAL_SHRINK) == 0) {
    return Error(EPERM,
                 "the file is not sealed with F_SEAL_SHRINK, so it could shrink under the "
                 "library's mapping; seal it (memfd_create with MFD_ALLOW_SEALING, then "
                 "F_ADD_SEALS), ask for FileSeal::apply, or opt in with FileSeal::allow_shrink");
  }
  if (seal == FileSeal::require && ((seals & F_SEAL_SHRINK) == 0 || (seals & kWriteSeals) == 0)) {
    return Error(EPERM,
                 "the file does not carry F_SEAL_SHRINK and F_SEAL_WRITE or F_SEAL_FUTURE_WRITE, "
                 "so it could be truncated or have holes punched while pinned; seal it, or ask "
                 "for FileSeal::apply");
  }
  const bool writable = access == O_RDWR && (seals & kWriteSeals) == 0;

  FileRegistry& reg = registry();
  std::unique_lock lk(reg.mu);
  std::shared_ptr<FileObject> obj = reg.files[{st.st_dev, st.st_ino}].lock();
  if (obj) {
    lk.unlock();
    std::unique_lock window(obj->window_mu_);
    if (writable && !obj->writable_) {
      if (Status s = obj->make_writable(fd); !s) return s.error();
    }
    if (Status s = obj->extend(fd, end); !s) return s.error();
  } else {
    auto created = create(fd, st, page_shift, writable, (seals & F_SEAL_SHRINK) != 0);
    if (!created.ok()) return created.error();
    obj = std::move(created).value();
    reg.files[{st.st_dev, st.st_ino}] = obj;
    lk.unlock();
  }
  // Seals only accumulate: one added since the window was made counts too.
  if ((seals & F_SEAL_SHRINK) != 0) obj->shrink_sealed_.store(true, std::memory_order_relaxed);
  if (seal == FileSeal::apply) {
    // F_SEAL_FUTURE_WRITE, not F_SEAL_WRITE: our window may be mapped
    // read-write already (F_SEAL_WRITE would be EBUSY), and writes through
    // existing mappings stay allowed. It forbids hole punching; together
    // with F_SEAL_SHRINK the pages under a pin cannot change identity.
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_FUTURE_WRITE) != 0) {
      return sys_error(errno, "sealing fd " + std::to_string(fd));
    }
    obj->shrink_sealed_.store(true, std::memory_order_relaxed);
  }
  // The file may have shrunk since the first fstat: a source past its end
  // would reach nothing.
  if (::fstat(fd, &st) != 0) return sys_error(EBADF, "fstat of fd " + std::to_string(fd));
  if (end > static_cast<uint64_t>(st.st_size)) {
    return Error(EINVAL, "the file shrank to " + std::to_string(st.st_size) +
                             " bytes, below the range's end (" + std::to_string(end) + ")");
  }
  return Range{std::move(obj), writable};
}

Result<std::shared_ptr<FileObject>> FileObject::create(int fd, const struct stat& st,
                                                       unsigned page_shift, bool writable,
                                                       bool shrink_sealed) {
  const uint64_t granule = 1ULL << page_shift;
  const uint64_t mapped = round_up(static_cast<uint64_t>(st.st_size), granule);
  const uint64_t window = std::max(round_up(mapped, kWindowAlign) * 2, kWindowAlign);
  // A 1 GiB-aligned window keeps the file offsets' alignment in host
  // addresses, which lets domains use 1 GiB leaves, for 2 MiB hugetlb files
  // too: one leaf instead of 512 made attaching plus detaching 1 GiB of
  // pinned huge pages 3x cheaper (bench/NOTES.md, Pinning). Windows of
  // hugetlb files used to sit 2 MiB off this alignment because the whole
  // 1 GiB range makes the VMA eligible for PMD sharing, which was measured
  // to slow mlock; on Linux 6.18 every shared hugetlb VMA takes its VMA lock
  // per huge page either way, and aligned and skewed windows lock equally
  // fast.
  // Reserve window + alignment slack, then trim to the aligned window.
  void* raw = sys::mmap(nullptr, window + kWindowAlign, PROT_NONE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED) return sys_error(ENOMEM, "reserving address space for the file");
  const uint64_t raw_addr = reinterpret_cast<uint64_t>(raw);
  const uint64_t base_addr = round_up(raw_addr, kWindowAlign);
  if (base_addr > raw_addr) munmap(raw, base_addr - raw_addr);
  munmap(reinterpret_cast<void*>(base_addr + window), raw_addr + kWindowAlign - base_addr);
  auto* base = reinterpret_cast<std::byte*>(base_addr);

  void* m = sys::mmap(base, mapped, writable ? PROT_READ | PROT_WRITE : PROT_READ,
                      MAP_SHARED | MAP_FIXED, fd, 0);
  if (m == MAP_FAILED) {
    const int err = errno;
    munmap(base, window);
    errno = err;
    return sys_error(ENODEV, "fd " + std::to_string(fd) + " cannot be mapped shared");
  }
  const int own_fd = sys::dup_cloexec(fd);
  if (own_fd < 0) {
    const int err = errno;
    munmap(base, window);
    errno = err;
    return sys_error(err, "duplicating fd " + std::to_string(fd));
  }
  std::shared_ptr<FileObject> obj(new (std::nothrow) FileObject(
      page_shift, own_fd, st.st_dev, st.st_ino, base, window, mapped, writable, shrink_sealed));
  if (!obj) {
    munmap(base, window);
    close(own_fd);
    return Error(ENOMEM, "out of memory");
  }
  return obj;
}

Status FileObject::extend(int fd, uint64_t end) {
  if (end <= mapped_) return {};
  struct stat st {};
  if (sys::fstat(fd, &st) != 0) return sys_error(EBADF, "fstat");
  const uint64_t granule = 1ULL << page_shift();
  const uint64_t target = round_up(static_cast<uint64_t>(st.st_size), granule);
  if (target < end) {
    return Error(EINVAL, "the file shrank to " + std::to_string(st.st_size) +
                             " bytes, below the range's end (" + std::to_string(end) + ")");
  }
  if (target > window_) {
    return Error(ENOMEM,
                 "the file grew past the address window reserved when it was first mapped (" +
                     std::to_string(window_) + " bytes)");
  }
  // From our own fd, whose access mode matches the window's.
  const auto off = static_cast<off_t>(mapped_);
  void* m =
      sys::mmap(base_ + mapped_, target - mapped_, writable_ ? PROT_READ | PROT_WRITE : PROT_READ,
                MAP_SHARED | MAP_FIXED, fd_, off);
  if (m == MAP_FAILED && writable_ && errno == EPERM) {
    // Write-sealed since the window became writable: sources made from now
    // on are read-only, so the new part needs no write access.
    m = sys::mmap(base_ + mapped_, target - mapped_, PROT_READ, MAP_SHARED | MAP_FIXED, fd_, off);
  }
  if (m == MAP_FAILED) return sys_error(ENODEV, "extending the file mapping");
  mapped_ = target;
  return {};
}

namespace {

// The VM_LOCKED parts of [start, end) of this process's address space, in
// address order, from /proc/self/smaps (mlock splits VMAs exactly at the
// locked boundaries).
Result<std::vector<std::pair<uint64_t, uint64_t>>> locked_ranges(uint64_t start, uint64_t end) {
  FILE* f = std::fopen("/proc/self/smaps", "re");
  if (f == nullptr) return sys_error(errno, "cannot read /proc/self/smaps");
  std::vector<std::pair<uint64_t, uint64_t>> out;
  char line[512];
  uint64_t vma_start = 0;
  uint64_t vma_end = 0;
  try {
    while (std::fgets(line, sizeof(line), f) != nullptr) {
      uint64_t a = 0;
      uint64_t b = 0;
      if (std::sscanf(line, "%" SCNx64 "-%" SCNx64 " ", &a, &b) == 2 &&
          std::strchr(line, ':') != nullptr && std::strncmp(line, "VmFlags", 7) != 0) {
        vma_start = a;
        vma_end = b;
        continue;
      }
      if (std::strncmp(line, "VmFlags:", 8) != 0) continue;
      if (vma_end <= start || vma_start >= end) continue;
      if (std::strstr(line, " lo") == nullptr) continue;
      out.emplace_back(std::max(vma_start, start), std::min(vma_end, end));
    }
  } catch (const std::bad_alloc&) {
    std::fclose(f);
    return Error(ENOMEM, "out of memory");
  }
  std::fclose(f);
  return out;
}

// What mlock does to a hugetlb mapping. Linux faults its pages in but
// neither marks the VMA VM_LOCKED nor counts it in VmLck (mm/mlock.c,
// mlock_fixup leaves hugetlb VMAs alone), so an unpin's munlock has nothing
// to undo there: it is a system call, about 1 us on the benchmark VM, with
// the discard check's fstat the whole of a 1 GiB hugetlb unpin. The VMA of
// the first hugetlb pin tells which kind of kernel this is (the kernel does
// not change under a running process); until then, or when smaps cannot be
// read, unpins munlock as for any file.
enum class HugetlbLock { unknown, locks, faults_in_only };
std::atomic<HugetlbLock> hugetlb_lock{HugetlbLock::unknown};

// [start, start + length) was just mlocked and no unpin can unlock it
// meanwhile (the pin's pending marks hold it).
void learn_hugetlb_lock(uint64_t start, uint64_t length) noexcept {
  auto locked = locked_ranges(start, start + length);
  if (!locked.ok()) return;
  hugetlb_lock.store(locked->empty() ? HugetlbLock::faults_in_only : HugetlbLock::locks,
                     std::memory_order_relaxed);
}

}  // namespace

Status FileObject::make_writable(int fd) {
  const uint64_t start = reinterpret_cast<uint64_t>(base_);
  auto locked = locked_ranges(start, start + mapped_);
  if (!locked.ok()) return locked.error();
  const int own_fd = sys::dup_cloexec(fd);
  if (own_fd < 0) return sys_error(errno, "duplicating fd " + std::to_string(fd));
  // MAP_FIXED replaces a piece of the read-only mapping in one step under
  // the kernel's mmap lock: a concurrent copy through the window faults into
  // the new one. Pinned pieces are mapped MAP_LOCKED, so they stay locked
  // (window_mu_ keeps every lock and unlock out meanwhile), and MAP_LOCKED's
  // memlock check comes before anything is replaced. A failure leaves each
  // piece either old or new, every pinned page locked, and the window
  // marked read-only, so a later writable fd starts over.
  auto remap = [&](uint64_t from, uint64_t to, bool lock) {
    if (from == to) return true;
    return sys::mmap(base_ + from, to - from, PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_FIXED | (lock ? MAP_LOCKED : 0), own_fd,
                     static_cast<off_t>(from)) != MAP_FAILED;
  };
  uint64_t pos = 0;
  bool ok = true;
  for (const auto& [a, b] : *locked) {
    ok = remap(pos, a - start, false) && remap(a - start, b - start, true);
    if (!ok) break;
    pos = b - start;
  }
  if (ok) ok = remap(pos, mapped_, false);
  if (!ok) {
    const int err = errno;
    close(own_fd);
    errno = err;
    return sys_error(err == EAGAIN ? ENOMEM : ENODEV, "remapping the file read-write");
  }
  close(fd_);
  fd_ = own_fd;
  writable_ = true;
  return {};
}

Status FileObject::lock_granules(uint64_t first, uint64_t last, bool /*write*/) {
  std::shared_lock window(window_mu_);
  // Past the end of a file that shrank, a fault fails; mlock would report
  // that as ENOMEM, indistinguishable from the memlock limit, so the size
  // tells them apart. Both kinds of file read it only when the lock failed:
  // an fstat is about a microsecond here, 1% of a 2 MiB pin.
  const uint64_t end = (last + 1) << page_shift();
  const auto shrunk = [&] {
    struct stat st {};
    return sys::fstat(fd_, &st) != 0 || static_cast<uint64_t>(st.st_size) < end;
  };
  const auto past_the_end = [] {
    return Error(EFAULT, "the file is shorter than the range being pinned (it shrank)");
  };
  std::byte* addr = base_ + (first << page_shift());
  const uint64_t length = (last - first + 1) << page_shift();
  if (page_shift() == kPageShift) {
    // Whether mlock populates this window is a property of the file's
    // mapping, so one pin whose pages mlock made resident answers it for
    // the object's life: later pins skip the mincore (a system call and a
    // walk of the range, 2% of a 2 MiB pin), and a page they cannot fault
    // in fails their mlock.
    const bool verify = !mlock_populates_.load(std::memory_order_relaxed);
    Status st = lock_resident(addr, length, verify);
    if (st && verify) mlock_populates_.store(true, std::memory_order_relaxed);
    if (!st && shrunk()) return past_the_end();
    return st;
  }
  // A shared hugetlb mapping reserved its huge pages at mmap time, so inside
  // the file a fault cannot fail for lack of pages, and one past its end
  // fails the mlock (hugetlb faults there are SIGBUS, which the populate
  // walk returns as an error): the size is needed only then. An fstat per
  // pin would be a fifth of a 1 GiB pin's time.
  if (sys::mlock(addr, length) != 0) {
    const int err = errno;
    unlock_range(addr, length);
    if (shrunk()) return past_the_end();
    return Error(ENOMEM, std::string("mlock failed: ") + errno_text(err));
  }
  if (hugetlb_lock.load(std::memory_order_relaxed) == HugetlbLock::unknown) {
    learn_hugetlb_lock(reinterpret_cast<uint64_t>(addr), length);
  }
  return {};
}

int64_t FileObject::file_size() const noexcept {
  std::shared_lock window(window_mu_);
  struct stat st {};
  if (::fstat(fd_, &st) != 0) return -1;
  return st.st_size;
}

int FileObject::add_inotify_watch(int inotify_fd, uint32_t mask) const noexcept {
  std::shared_lock window(window_mu_);
  char path[32];
  std::snprintf(path, sizeof(path), "/proc/self/fd/%d", fd_);
  return inotify_add_watch(inotify_fd, path, mask);
}

bool FileObject::present(uint64_t offset, uint64_t length) const noexcept {
  uint64_t end = 0;
  if (__builtin_add_overflow(offset, length, &end)) return false;
  struct stat st {};
  std::shared_lock window(window_mu_);
  if (end > mapped_) return false;
  // Not an injection site: a failed probe is "absent", not an error path.
  return ::fstat(fd_, &st) == 0 && static_cast<uint64_t>(st.st_size) >= end;
}

bool FileObject::copy_out(uint64_t offset, void* buf, size_t n) const noexcept {
  return safe_copy(buf, base_ + offset, n);
}

bool FileObject::copy_in(uint64_t offset, const void* buf, size_t n) const noexcept {
  return safe_copy(base_ + offset, buf, n);
}

// hugetlbfs counts each huge page the file holds in its blocks (512-byte
// units, a huge page's worth each), and only pages it holds count. A file
// at least as long as the range that holds exactly as many pages as its
// size needs has no hole, so one fstat answers what mincore needs a call per
// MiB for (a 1 GiB unpin: 1,024 calls, 60 times the munlock). A file that
// also holds pages past its end (FALLOC_FL_KEEP_SIZE) fails the equality
// unless as many holes offset them exactly, which it then cannot tell apart.
bool FileObject::holds_every_page(const std::byte* range_end) const noexcept {
  struct stat st {};
  if (::fstat(fd_, &st) != 0) return false;
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  const uint64_t granule = 1ULL << page_shift();
  return size >= static_cast<uint64_t>(range_end - base_) &&
         static_cast<uint64_t>(st.st_blocks) * 512 == round_up(size, granule);
}

// A pinned page is locked, so the only way it leaves the file is by being
// discarded (a hole punched, the file truncated): its replacement, if
// anything touched the offset since, cannot be told apart.
void FileObject::count_discarded(std::byte* addr, uint64_t length) noexcept {
  if (page_shift() != kPageShift && holds_every_page(addr + length)) return;
  // One call per 16 MiB (a 2 MiB unpin: one mincore).
  constexpr uint64_t kBatch = 4096;
  unsigned char resident[kBatch];
  for (uint64_t done = 0; done < length;) {
    const uint64_t n = std::min(kBatch, (length - done) >> kPageShift);
    if (::mincore(addr + done, n << kPageShift, resident) != 0) return;
    uint64_t missing = 0;
    for (uint64_t i = 0; i < n; ++i) missing += (resident[i] & 1) == 0 ? 1 : 0;
    if (missing != 0) discarded_pages_.fetch_add(missing, std::memory_order_relaxed);
    done += n << kPageShift;
  }
}

void FileObject::unlock_granules(uint64_t first, uint64_t last) noexcept {
  std::shared_lock window(window_mu_);
  std::byte* addr = base_ + (first << page_shift());
  const uint64_t length = (last - first + 1) << page_shift();
  count_discarded(addr, length);
  if (page_shift() == kPageShift ||
      hugetlb_lock.load(std::memory_order_relaxed) != HugetlbLock::faults_in_only) {
    unlock_range(addr, length);
  }
}

}  // namespace iomm::mem
