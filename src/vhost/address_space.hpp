// One address space the device's DMA goes through: guest-physical
// addresses (the memory table) or IOVAs (the IOTLB). It is an iomm Ioas
// with one Access for translated, bounds-checked copies.
//
// Contract
// - Nothing is pinned or charged: the Ioas never has a domain and the
//   Access never pins (AccountMode::none besides).
// - Only file sources are mapped (map() refuses others with EINVAL): every
//   host address segments() returns is then the library's own MAP_SHARED
//   mapping of a file the front end sent, which stays mapped while the
//   mapping lives. It may be a file that can shrink (FileSeal::allow_shrink):
//   plain loads and stores there could SIGBUS, so the host runs are for
//   system calls only (preadv/pwritev), which the kernel fails with EFAULT
//   or a short count on a page past the end of the file, never a signal.
// - read/write copy whole ranges or nothing useful: ENOENT part of the
//   range is not mapped (outside guest memory, or an IOTLB miss), EPERM
//   the mapping lacks the permission, EFAULT the memory behind it is gone
//   (a shrunk file), EOVERFLOW the range wraps. segments() fails the same
//   way (and ENOMEM), touching no memory.
// - Not thread-safe against its own map/unmap callers beyond what Ioas
//   guarantees; the back end uses it from one thread, so host runs it got
//   stay mapped until that thread unmaps them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "iomm/access.hpp"
#include "iomm/ioas.hpp"
#include "iomm/result.hpp"

namespace iomm::vhost {

class AddressSpace {
 public:
  static Result<AddressSpace> create();

  [[nodiscard]] Ioas& ioas() const noexcept { return *ioas_; }
  [[nodiscard]] const std::shared_ptr<Ioas>& ioas_ptr() const noexcept { return ioas_; }
  // Ioas::map of a file source at `iova`; EINVAL for any other kind.
  Result<uint64_t> map(const MemorySource& source, uint32_t prot, uint64_t iova) const;
  Status read(uint64_t addr, void* buf, size_t length) const {
    return note(access_->read(addr, buf, length), addr, length, false);
  }
  Status write(uint64_t addr, const void* buf, size_t length) const {
    return note(access_->write(addr, buf, length), addr, length, true);
  }
  // Appends the host runs of [addr, addr + length) to `out` (the device
  // writes them when `device_writes`); on failure `out` is as it was.
  Status segments(uint64_t addr, uint64_t length, bool device_writes,
                  std::vector<Ioas::HostSegment>& out) const;

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
