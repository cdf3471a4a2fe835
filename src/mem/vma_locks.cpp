#include "mem/vma_locks.hpp"

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include "core/errno_text.hpp"
#include "iomm/range.hpp"

namespace iomm::mem {

namespace {

struct FileCloser {
  void operator()(FILE* file) const noexcept { std::fclose(file); }
};
// getline's buffer, reused for every line.
struct LineBuffer {
  LineBuffer() = default;
  ~LineBuffer() { std::free(line); }
  LineBuffer(const LineBuffer&) = delete;
  LineBuffer& operator=(const LineBuffer&) = delete;
  char* line = nullptr;
  size_t capacity = 0;
};

// A VMA header line: "start-end perms offset dev inode [path]", addresses in
// lowercase hex. Field lines start with a capitalised name ("Size:").
bool parse_header(const char* line, uint64_t* start, uint64_t* end) {
  char* rest = nullptr;
  *start = std::strtoull(line, &rest, 16);
  if (rest == line || *rest != '-') return false;
  const char* second = rest + 1;
  *end = std::strtoull(second, &rest, 16);
  return rest != second && *rest == ' ';
}

// "VmFlags: rd wr mr mw me lo ac": two-letter mnemonics separated by spaces.
bool has_locked_flag(const char* flags) {
  for (const char* p = flags; *p != '\0';) {
    while (*p == ' ') ++p;
    if (p[0] == 'l' && p[1] == 'o' && (p[2] == ' ' || p[2] == '\n' || p[2] == '\0')) return true;
    while (*p != ' ' && *p != '\0') ++p;
  }
  return false;
}

// msync(MS_INVALIDATE) fails with EBUSY when any VMA in the range is
// VM_LOCKED and otherwise does nothing (Linux ignores MS_INVALIDATE since
// 2.6.19). It only walks the VMA list, where smaps walks every page table
// before the range: one cheap call settles the common case of no lock.
bool any_vma_locked(uint64_t first, uint64_t last) {
  const long result =
      syscall(SYS_msync, first << kPageShift, (last - first + 1) << kPageShift, MS_INVALIDATE);
  return result != 0 && errno == EBUSY;
}

}  // namespace

Result<std::vector<PageRun>> vm_locked_runs(uint64_t first, uint64_t last) {
  if (!any_vma_locked(first, last)) return std::vector<PageRun>{};
  const std::unique_ptr<FILE, FileCloser> smaps(std::fopen("/proc/self/smaps", "re"));
  if (smaps == nullptr) {
    const int err = errno;
    return Error(
        err, std::string("cannot open /proc/self/smaps to find the application's own mlocks: ") +
                 errno_text(err));
  }
  std::vector<PageRun> runs;
  LineBuffer buffer;
  bool in_range = false;
  uint64_t vma_first = 0;
  uint64_t vma_last = 0;
  try {
    while (true) {
      errno = 0;
      if (getline(&buffer.line, &buffer.capacity, smaps.get()) < 0) {
        if (errno == 0) break;
        const int err = errno;
        return Error(err, std::string("cannot read /proc/self/smaps: ") + errno_text(err));
      }
      uint64_t start = 0;
      uint64_t end = 0;
      if (parse_header(buffer.line, &start, &end)) {
        in_range = false;
        if (end <= start) continue;
        vma_first = start >> kPageShift;
        vma_last = (end - 1) >> kPageShift;
        if (vma_first > last) break;
        in_range = vma_last >= first;
        continue;
      }
      if (!in_range || std::strncmp(buffer.line, "VmFlags:", 8) != 0) continue;
      if (!has_locked_flag(buffer.line + 8)) continue;
      const PageRun run{std::max(first, vma_first), std::min(last, vma_last)};
      if (!runs.empty() && runs.back().last + 1 == run.first) {
        runs.back().last = run.last;
      } else {
        runs.push_back(run);
      }
    }
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory reading /proc/self/smaps");
  }
  return runs;
}

}  // namespace iomm::mem
