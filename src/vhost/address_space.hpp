// One address space the device's DMA goes through: guest-physical
// addresses (the memory table) or IOVAs (the IOTLB). It is an iomm Ioas
// with one Access for translated, bounds-checked copies.
//
// Contract
// - Nothing is pinned or charged: the Ioas never has a domain and the
//   Access never pins (AccountMode::none besides).
// - read/write copy whole ranges or nothing useful: ENOENT part of the
//   range is not mapped (outside guest memory, or an IOTLB miss), EPERM
//   the mapping lacks the permission, EFAULT the memory behind it is gone
//   (a shrunk file), EOVERFLOW the range wraps.
// - Not thread-safe against its own map/unmap callers beyond what Ioas
//   guarantees; the back end uses it from one thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "iomm/access.hpp"
#include "iomm/ioas.hpp"
#include "iomm/result.hpp"

namespace iomm::vhost {

class AddressSpace {
 public:
  static Result<AddressSpace> create();

  [[nodiscard]] Ioas& ioas() const noexcept { return *ioas_; }
  [[nodiscard]] const std::shared_ptr<Ioas>& ioas_ptr() const noexcept { return ioas_; }
  Status read(uint64_t addr, void* buf, size_t length) const {
    return note(access_->read(addr, buf, length), addr, length, false);
  }
  Status write(uint64_t addr, const void* buf, size_t length) const {
    return note(access_->write(addr, buf, length), addr, length, true);
  }

  // The range of the last access that failed, so the caller can name the
  // address of an IOTLB miss.
  struct Fault {
    uint64_t addr = 0;
    uint64_t length = 0;
    bool write = false;
  };
  [[nodiscard]] const Fault& last_fault() const noexcept { return fault_; }

 private:
  AddressSpace(std::shared_ptr<Ioas> ioas, std::shared_ptr<Access> access)
      : ioas_(std::move(ioas)), access_(std::move(access)) {}
  std::shared_ptr<Ioas> ioas_;
  std::shared_ptr<Access> access_;
  mutable Fault fault_;

  Status note(Status s, uint64_t addr, uint64_t length, bool write) const {
    if (!s) fault_ = Fault{addr, length, write};
    return s;
  }
};

}  // namespace iomm::vhost
