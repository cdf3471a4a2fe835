// Pool memory as the backing of an IOAS mapping: the allocation's view
// mapped shared by the library, reached by DMA with guarded copies (a
// revoked allocation is truncated: SIGBUS becomes EFAULT), never charged to
// memlock and never mlocked (device memory, as type1 treats MMIO).
//
// Long-term pins need a revocation registration: an object made for a
// registered IOAS mapping (P2pAllocation::map_into) pins; one made for
// anybody else refuses every pin with EPERM.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "iomm/result.hpp"
#include "mem/mem_object.hpp"

namespace iomm::devmem {

class DeviceObject final : public mem::MemObject {
 public:
  static Result<std::shared_ptr<DeviceObject>> create(int fd, uint64_t size, bool registered);
  DeviceObject(int fd, std::byte* base, uint64_t size, bool registered)
      : MemObject(SourceKind::device, kPageShift),
        fd_(fd),
        base_(base),
        size_(size),
        registered_(registered) {}
  ~DeviceObject() override;

  [[nodiscard]] uint64_t dma_address(uint64_t offset) const noexcept override {
    return reinterpret_cast<uint64_t>(base_) + offset;
  }
  [[nodiscard]] void* host(uint64_t offset) const noexcept override { return base_ + offset; }
  [[nodiscard]] bool shrink_sealed() const noexcept override { return false; }
  [[nodiscard]] bool charged() const noexcept override { return false; }
  // Within the allocation and not revoked (a revoked allocation's view is
  // truncated): on-demand mappings of pool memory translate only then.
  [[nodiscard]] bool present(uint64_t offset, uint64_t length) const noexcept override;
  bool copy_out(uint64_t offset, void* buf, size_t n) const noexcept override;
  bool copy_in(uint64_t offset, const void* buf, size_t n) const noexcept override;

 protected:
  Status lock_granules(uint64_t first, uint64_t last, bool write) override;
  // Nothing was locked: device memory stays resident by itself.
  void unlock_granules(uint64_t, uint64_t) noexcept override {}

 private:
  const int fd_;  // our duplicate of the view, to see a truncation
  std::byte* const base_;
  const uint64_t size_;
  const bool registered_;
};

}  // namespace iomm::devmem
