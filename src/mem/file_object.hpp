// A file (memfd, hugetlb memfd, tmpfs file) mapped MAP_SHARED once by the
// library for all sources that use it.
//
// The mapping sits at the start of a reserved, 1 GiB-aligned window of
// address space twice the file's size (at least 1 GiB), so host addresses
// keep the file offsets' alignment (large IOMMU leaves) and a file that grows
// is extended in place, keeping one mapping, one pin count and one charge per
// page.
#pragma once

#include <sys/types.h>

#include <memory>
#include <mutex>

#include "mem/mem_object.hpp"

namespace iomm::mem {

class FileObject final : public MemObject {
 public:
  // The object for fd's inode, creating or extending the mapping so that it
  // covers [offset, offset + length). Errors as MemorySource::from_file.
  static Result<std::shared_ptr<FileObject>> for_range(int fd, uint64_t offset, uint64_t length);
  ~FileObject() override;

  [[nodiscard]] uint64_t dma_address(uint64_t offset) const noexcept override {
    return reinterpret_cast<uint64_t>(base_) + offset;
  }
  [[nodiscard]] void* host(uint64_t offset) const noexcept override { return base_ + offset; }
  [[nodiscard]] bool shrink_sealed() const noexcept override { return shrink_sealed_; }
  // Through our own mapping; a truncated file raises SIGBUS, which
  // safe_copy turns into false.
  bool copy_out(uint64_t offset, void* buf, size_t n) const noexcept override;
  bool copy_in(uint64_t offset, const void* buf, size_t n) const noexcept override;
  [[nodiscard]] bool writable() const noexcept { return writable_; }

 protected:
  Status lock_granules(uint64_t first, uint64_t last, bool write) override;
  void unlock_granules(uint64_t first, uint64_t last) noexcept override;

 private:
  FileObject(unsigned page_shift, int fd, dev_t dev, ino_t ino, std::byte* base, uint64_t window,
             uint64_t mapped, bool writable, bool shrink_sealed);
  Status extend(int fd, uint64_t end);

  const int fd_;  // our own duplicate: the file's size is checked when pinning
  const dev_t dev_;
  const ino_t ino_;
  std::byte* const base_;
  const uint64_t window_;
  std::mutex extend_mu_;
  uint64_t mapped_;  // guarded by extend_mu_
  const bool writable_;
  const bool shrink_sealed_;
};

}  // namespace iomm::mem
