// A file (memfd, hugetlb memfd, tmpfs file) mapped MAP_SHARED once by the
// library for all sources that use it.
//
// The mapping sits at the start of a reserved, 1 GiB-aligned window of
// address space twice the file's size (at least 1 GiB), so host addresses
// keep the file offsets' alignment (large IOMMU leaves) and a file that grows
// is extended in place, keeping one mapping, one pin count and one charge per
// page.
//
// Writability belongs to each source, not to the window: a source is
// writable when the fd it was made from is open read-write and the file
// carries no write seal. The window is read-write as soon as one such fd has
// been seen (a window first mapped read-only is remapped in place, its locked
// ranges mapped locked) and is never downgraded; read-only sources are kept
// read-only by the IOAS, which refuses to map them for write.
//
// Locking: window_mu_ (shared by lock/unlock, exclusive to extend or
// upgrade the window) is taken after the registry lock and with no pin lock
// held.
#pragma once

#include <sys/stat.h>
#include <sys/types.h>

#include <atomic>
#include <memory>
#include <shared_mutex>

#include "iomm/source.hpp"
#include "mem/mem_object.hpp"
#include "sync/ranked_mutex.hpp"

namespace iomm::mem {

class FileObject final : public MemObject {
 public:
  struct Range {
    std::shared_ptr<FileObject> object;
    bool writable;  // through the fd the range was asked for
  };
  // The object for fd's inode, creating, extending or upgrading the mapping
  // so that it covers [offset, offset + length). Errors as
  // MemorySource::from_file.
  static Result<Range> for_range(int fd, uint64_t offset, uint64_t length, FileSeal seal);
  ~FileObject() override;

  [[nodiscard]] uint64_t dma_address(uint64_t offset) const noexcept override {
    return reinterpret_cast<uint64_t>(base_) + offset;
  }
  [[nodiscard]] void* host(uint64_t offset) const noexcept override { return base_ + offset; }
  [[nodiscard]] bool shrink_sealed() const noexcept override {
    return shrink_sealed_.load(std::memory_order_relaxed);
  }
  // Through our own mapping; a truncated file raises SIGBUS, which
  // safe_copy turns into false.
  // The file is at least offset + length long (fstat of our duplicate).
  [[nodiscard]] bool present(uint64_t offset, uint64_t length) const noexcept override;
  bool copy_out(uint64_t offset, void* buf, size_t n) const noexcept override;
  bool copy_in(uint64_t offset, const void* buf, size_t n) const noexcept override;
  // The file's size now (fstat of the object's own fd); -1 on failure.
  [[nodiscard]] int64_t file_size() const noexcept;
  // inotify_add_watch of the file for `mask`, through the object's own fd:
  // the watch descriptor, or -1 with errno.
  int add_inotify_watch(int inotify_fd, uint32_t mask) const noexcept;
  // 4 KiB pages found missing from the file when their last pin was
  // released: pages someone discarded (FALLOC_FL_PUNCH_HOLE) while they were
  // pinned and charged.
  [[nodiscard]] uint64_t discarded_pages() const noexcept {
    return discarded_pages_.load(std::memory_order_relaxed);
  }

 protected:
  Status lock_granules(uint64_t first, uint64_t last, bool write) override;
  void unlock_granules(uint64_t first, uint64_t last) noexcept override;

 private:
  FileObject(unsigned page_shift, int fd, dev_t dev, ino_t ino, std::byte* base, uint64_t window,
             uint64_t mapped, bool writable, bool shrink_sealed);
  static Result<std::shared_ptr<FileObject>> create(int fd, const struct stat& st,
                                                    unsigned page_shift, bool writable,
                                                    bool shrink_sealed);
  // Make the window cover [0, end) of the file (fd: the caller's). window_mu_
  // held exclusively.
  Status extend(int fd, uint64_t end);
  // Remap the window read-write from fd (open read-write, no write seal).
  // window_mu_ held exclusively.
  Status make_writable(int fd);
  void count_discarded(std::byte* addr, uint64_t length) noexcept;
  // hugetlb only: the file holds every page up to its size, which reaches
  // range_end (an address in the window).
  [[nodiscard]] bool holds_every_page(const std::byte* range_end) const noexcept;

  const dev_t dev_;
  const ino_t ino_;
  std::byte* const base_;
  const uint64_t window_;
  mutable sync::RankedSharedMutex window_mu_{sync::LockRank::file_window, "FileObject::window_mu_"};
  int fd_;           // window_mu_; our own duplicate, read-write once the window is
  uint64_t mapped_;  // window_mu_
  bool writable_;    // window_mu_
  std::atomic<bool> shrink_sealed_;
  std::atomic<uint64_t> discarded_pages_{0};
  // 4 KiB files: a pin's mlock made every page of its range resident (see
  // lock_resident), so mlock populates this window.
  std::atomic<bool> mlock_populates_{false};
};

}  // namespace iomm::mem
