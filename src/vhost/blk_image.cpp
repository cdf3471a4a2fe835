#include "vhost/blk_image.hpp"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "vhost/protocol.hpp"

namespace iomm::vhost {

Result<BlkImage> BlkImage::open(const std::string& path, bool read_only) {
  UniqueFd fd(::open(path.c_str(), (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC));
  if (!fd.valid()) return Error(errno, "open " + path + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return Error(errno, "fstat " + path);
  uint64_t bytes = 0;
  if (S_ISREG(st.st_mode)) {
    bytes = static_cast<uint64_t>(st.st_size);
  } else if (S_ISBLK(st.st_mode)) {
    if (::ioctl(fd.get(), BLKGETSIZE64, &bytes) != 0) return Error(errno, "BLKGETSIZE64 " + path);
  } else {
    return Error(EINVAL, path + " is neither a regular file nor a block device");
  }
  if (bytes < kSectorSize) return Error(EINVAL, path + " is smaller than one sector");
  std::string serial = path.substr(path.find_last_of('/') + 1);
  serial.resize(std::min<size_t>(serial.size(), kBlkIdBytes));
  return BlkImage(std::move(fd), bytes / kSectorSize, read_only, std::move(serial));
}

Status BlkImage::flush() const {
  if (::fdatasync(fd_.get()) != 0)
    return Error(errno, std::string("fdatasync: ") + std::strerror(errno));
  return {};
}

}  // namespace iomm::vhost
