// The raw image file a virtio-blk back end serves.
//
// Contract
// - Owns the image fd. The capacity is the file's size in 512-byte sectors,
//   rounded down, read when it is opened.
// - read_only: opened O_RDONLY, and the device offers VIRTIO_BLK_F_RO.
// - Errors of open(): the errno of open/fstat; EINVAL not a regular file or
//   block device, or smaller than one sector.
#pragma once

#include <cstdint>
#include <string>

#include "iomm/result.hpp"
#include "vhost/unique_fd.hpp"

namespace iomm::vhost {

class BlkImage {
 public:
  static Result<BlkImage> open(const std::string& path, bool read_only);

  [[nodiscard]] int fd() const noexcept { return fd_.get(); }
  [[nodiscard]] uint64_t sectors() const noexcept { return sectors_; }
  [[nodiscard]] bool read_only() const noexcept { return read_only_; }
  // The device's serial for GET_ID (at most 20 bytes): the image's name.
  [[nodiscard]] const std::string& serial() const noexcept { return serial_; }
  Status flush() const;

 private:
  BlkImage(UniqueFd fd, uint64_t sectors, bool read_only, std::string serial)
      : fd_(std::move(fd)), sectors_(sectors), read_only_(read_only), serial_(std::move(serial)) {}
  UniqueFd fd_;
  uint64_t sectors_;
  bool read_only_;
  std::string serial_;
};

}  // namespace iomm::vhost
