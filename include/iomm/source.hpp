// Memory sources: what an IOAS mapping points at.
//
// Contract
// - A MemorySource is a cheap value: a reference to a backing object plus a
//   byte range of it. Copies share the backing object.
// - Page identity is the backing object plus the page offset within it:
//   (device, inode, offset) for files, the virtual address for this process's
//   memory, and a synthetic serial for simulated memory. The same page reached
//   through several sources, mappings or address spaces is pinned once and
//   charged once per owner.
// - Files are mapped MAP_SHARED once per inode by the library, however many
//   sources use them; the mapping lives while any source or mapping uses it.
// - Writability is per source: a file source is writable when the fd it was
//   made from is open read-write and the file carries no F_SEAL_WRITE or
//   F_SEAL_FUTURE_WRITE, whatever other fds of the same file were used
//   before or after.
// - Files must not shrink under the library's mapping unless the caller
//   says so: by default from_file refuses a file without F_SEAL_SHRINK
//   (FileSeal below); FileSeal::allow_shrink opts in.
// - Pinned file pages stay the file's only while nobody truncates the file
//   or punches a hole in it: the kernel then drops them from the file (and
//   from the library's mapping) although they are pinned and charged. Ask
//   for FileSeal::apply or FileSeal::require when the memory must be stable;
//   otherwise discarded_pages() reports what was found gone at unpin.
// - Creation never touches the memory; pinning happens later (lazy).
// - Thread-safe: sources are immutable.
//
// Errors (from the factories)
// - EBADF   the fd is not open.
// - ENODEV  the fd cannot be mapped shared (not a regular file, or mmap refuses).
// - EINVAL  zero length; range past the end of the file (also when the file
//           shrank while the source was being made).
// - EPERM   FileSeal::shrink (the default) and the file does not carry
//           F_SEAL_SHRINK; FileSeal::require and the file is not sealed;
//           FileSeal::apply and the seals cannot be added (fd not
//           writable, F_SEAL_SEAL).
//           FileSeal::apply on a file that cannot be sealed gives EINVAL.
// - EOVERFLOW offset + length wraps.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "iomm/export.hpp"
#include "iomm/result.hpp"

namespace iomm {

namespace mem {
class MemObject;
}

// device: P2P pool memory (iomm/p2p_pool.hpp), never charged to memlock.
enum class SourceKind { file, user, simulated, device };

// What from_file guarantees about the file's pages while they are pinned.
enum class FileSeal {
  // The default: the file must already carry F_SEAL_SHRINK, so it can grow
  // but never shrink under a mapping (EPERM otherwise, which names the
  // choices below). Holes can still be punched unless F_SEAL_FUTURE_WRITE
  // or F_SEAL_WRITE is there too (see the contract above).
  shrink,
  // The file already carries F_SEAL_SHRINK and F_SEAL_WRITE or
  // F_SEAL_FUTURE_WRITE (so the source is read-only); EPERM otherwise.
  require,
  // Add F_SEAL_SHRINK | F_SEAL_FUTURE_WRITE (memfds made with
  // MFD_ALLOW_SEALING) after the library's mapping is made, so the source
  // keeps the fd's writability; from then on nobody can shrink the file,
  // punch holes in it or map it writable anew.
  apply,
  // Opt in to a file that may shrink (unsealed memfds, tmpfs and hugetlbfs
  // files that cannot be sealed): every copy the library makes of it is
  // guarded (a truncated page gives EFAULT, never SIGBUS), host_segments
  // reports its memory as not safe for plain loads and stores, and a
  // truncation watched by the memory monitor becomes an invalidation
  // (InvalidationCause::truncate, iomm/memory_monitor.hpp).
  allow_shrink,
};

class IOMM_API MemorySource {
 public:
  // A range of a memfd, hugetlb memfd or tmpfs file. An fd opened read-only,
  // or a write-sealed file, gives a read-only source (mapping it for write
  // is EPERM). A hugetlb range may start and end at any 4 KiB boundary: its
  // pins cover and charge whole huge pages.
  static Result<MemorySource> from_file(int fd, uint64_t offset, uint64_t length,
                                        FileSeal seal = FileSeal::shrink);
  // A range of this process's virtual memory. Nothing is checked until it is
  // pinned: an unmapped address fails then, with EFAULT.
  // - Keep it mapped while it is mapped in an IOAS. Unmapped or protected
  //   later, device DMA to it fails with EFAULT (iomm/domain.hpp); but if
  //   other memory is mapped at the same addresses, DMA reaches that memory:
  //   address reuse cannot be detected in user space. File-backed memory
  //   (from_file) has no such hazard and is the recommended source.
  // - Pinning mlocks the pages; unpinning munlocks only pages the process
  //   had not locked itself when they were pinned (mlock is not counted by
  //   the kernel). Take your own mlock/mlockall before mapping: a lock taken
  //   while iomm holds the pages pinned is undone when it unpins them, and
  //   your munlock of pinned pages undoes iomm's.
  static Result<MemorySource> from_user(void* address, uint64_t length, bool writable = true);
  // Synthetic pages with no memory behind them, for scale tests. Pinning
  // counts and charges but locks nothing; DMA to it fails with ENXIO.
  static Result<MemorySource> simulated(uint64_t length);

  [[nodiscard]] SourceKind kind() const noexcept;
  [[nodiscard]] uint64_t offset() const noexcept { return offset_; }
  [[nodiscard]] uint64_t length() const noexcept { return length_; }
  [[nodiscard]] bool writable() const noexcept { return writable_; }
  // Page size of the backing (4 KiB, or the hugetlb page size).
  [[nodiscard]] uint64_t page_size() const noexcept;
  // Whether the backing file carries F_SEAL_SHRINK. Without it, DMA paths
  // guard their copies so a shrunk file gives EFAULT, never SIGBUS.
  [[nodiscard]] bool shrink_sealed() const noexcept;
  // Pages of the backing file found discarded when their last pin was
  // released (0 for other kinds): see the contract above.
  [[nodiscard]] uint64_t discarded_pages() const noexcept;
  // The same range, read-only.
  [[nodiscard]] MemorySource read_only() const;
  // Host address of the first byte, or nullptr for simulated memory.
  [[nodiscard]] void* host_address() const noexcept;
  // Same backing object and range, narrowed to [offset() + skip, + length).
  [[nodiscard]] MemorySource slice(uint64_t skip, uint64_t length) const;

  [[nodiscard]] const std::shared_ptr<mem::MemObject>& object() const noexcept { return object_; }

  // Internal: a source over a backing kind implemented outside src/mem
  // (device memory, src/devmem).
  static MemorySource from_backing(std::shared_ptr<mem::MemObject> object, uint64_t offset,
                                   uint64_t length, bool writable) {
    return MemorySource(std::move(object), offset, length, writable);
  }

 private:
  MemorySource(std::shared_ptr<mem::MemObject> object, uint64_t offset, uint64_t length,
               bool writable)
      : object_(std::move(object)), offset_(offset), length_(length), writable_(writable) {}

  std::shared_ptr<mem::MemObject> object_;
  uint64_t offset_;
  uint64_t length_;
  bool writable_;
};

}  // namespace iomm
