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
// - Creation never touches the memory; pinning happens later (lazy).
// - Thread-safe: sources are immutable.
//
// Errors (from the factories)
// - EBADF   the fd is not open.
// - ENODEV  the fd cannot be mapped shared (not a regular file, or mmap refuses).
// - EINVAL  zero length; range past the end of the file; for hugetlb files an
//           offset or length that is not a multiple of the huge page size.
// - EOVERFLOW offset + length wraps.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "iomm/result.hpp"

namespace iomm {

namespace mem {
class MemObject;
}

enum class SourceKind { file, user, simulated };

class MemorySource {
 public:
  // A range of a memfd, hugetlb memfd or tmpfs file. A file opened read-only
  // gives a read-only source (mapping it for write is EPERM).
  static Result<MemorySource> from_file(int fd, uint64_t offset, uint64_t length);
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
  // Host address of the first byte, or nullptr for simulated memory.
  [[nodiscard]] void* host_address() const noexcept;
  // Same backing object and range, narrowed to [offset() + skip, + length).
  [[nodiscard]] MemorySource slice(uint64_t skip, uint64_t length) const;

  [[nodiscard]] const std::shared_ptr<mem::MemObject>& object() const noexcept { return object_; }

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
