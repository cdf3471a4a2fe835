// The consumer side of device regions: map shared, register the mapping
// with a minor-mode userfaultfd, hand the descriptor to the owner.
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <new>

#include "devmem/region_state.hpp"
#include "devmem/uffd.hpp"
#include "devmem/wire.hpp"
#include "iomm/device_region.hpp"

namespace iomm {

namespace {

Status check_request(MapMode mode, uint64_t offset, uint64_t length, uint64_t size) {
  if (mode != MapMode::shared) {
    return Error(EINVAL,
                 "device memory cannot be mapped private (copy-on-write): the consumer would "
                 "get pages the device never sees; map it shared");
  }
  if (length == 0 || offset % devmem::kPage != 0 || length % devmem::kPage != 0) {
    return Error(EINVAL, "offset and length must be non-zero multiples of 4 KiB");
  }
  if (length > size || offset > size - length) {
    return Error(EINVAL, "range past the end of the device region");
  }
  return {};
}

// Map and register; on success the caller owns both.
struct Registered {
  std::byte* data;
  devmem::Uffd uffd;
};

Result<Registered> map_and_register(int fd, uint64_t file_offset, uint64_t length) {
  auto uffd = devmem::open_minor_uffd();
  if (!uffd.ok()) return uffd.error();
  void* addr = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                    static_cast<off_t>(file_offset));
  if (addr == MAP_FAILED) {
    const int err = errno;
    close(uffd->fd);
    return Error(err, "mmap of device memory");
  }
  uffdio_register reg{};
  reg.range = {reinterpret_cast<uint64_t>(addr), length};
  reg.mode = UFFDIO_REGISTER_MODE_MINOR;
  if (ioctl(uffd->fd, UFFDIO_REGISTER, &reg) != 0) {
    const int err = errno;
    munmap(addr, length);
    close(uffd->fd);
    return Error(err, "UFFDIO_REGISTER (minor) of the device mapping");
  }
  return Registered{static_cast<std::byte*>(addr), *uffd};
}

}  // namespace

Result<std::unique_ptr<DeviceMapping>> DeviceMapping::map(
    const std::shared_ptr<DeviceRegion>& region, uint64_t offset, uint64_t length, MapMode mode) {
  if (Status st = check_request(mode, offset, length, region->size()); !st) return st.error();
  auto reg = map_and_register(region->exported().fd, region->exported().offset + offset, length);
  if (!reg.ok()) return reg.error();
  const uint64_t address = reinterpret_cast<uint64_t>(reg->data);
  // The region takes the descriptor, closing it on failure.
  auto id = region->state().attach(reg->uffd.fd, reg->uffd.features, address, offset, length,
                                   getpid(), 0);
  if (!id.ok()) {
    munmap(reg->data, length);
    return id.error();
  }
  try {
    return std::unique_ptr<DeviceMapping>(
        new DeviceMapping(reg->data, offset, length, region->state().weak_from_this(), -1, *id));
  } catch (const std::bad_alloc&) {
    munmap(reg->data, length);
    (void)region->state().detach(*id);
    return Error(ENOMEM, "out of memory for a device mapping");
  }
}

Result<std::unique_ptr<DeviceMapping>> DeviceMapping::map_remote(int socket,
                                                                 const ExportedRegion& region,
                                                                 uint64_t offset, uint64_t length,
                                                                 MapMode mode) {
  if (Status st = check_request(mode, offset, length, region.size); !st) return st.error();
  auto reg = map_and_register(region.fd, region.offset + offset, length);
  if (!reg.ok()) return reg.error();
  devmem::wire::Request req;
  req.op = devmem::wire::kMap;
  req.address = reinterpret_cast<uint64_t>(reg->data);
  req.offset = offset;
  req.length = length;
  req.features = reg->uffd.features;
  const bool sent = devmem::wire::send_packet(socket, &req, sizeof req, reg->uffd.fd);
  const int send_err = errno;
  // The owner holds its own copy now; the registration lives as long as it.
  close(reg->uffd.fd);
  devmem::wire::Reply reply;
  int fd = -1;
  pid_t pid = 0;
  int rc = sent ? devmem::wire::recv_packet(socket, &reply, sizeof reply, &fd, &pid) : send_err;
  if (fd >= 0) close(fd);
  if (rc == 0 && reply.error != 0) {
    munmap(reg->data, length);
    reply.message[sizeof reply.message - 1] = '\0';
    return Error(reply.error,
                 std::string("the device owner refused the mapping: ") + reply.message);
  }
  if (rc != 0) {
    munmap(reg->data, length);
    return Error(rc < 0 ? ECONNRESET : rc, "no answer from the device owner");
  }
  try {
    return std::unique_ptr<DeviceMapping>(
        new DeviceMapping(reg->data, offset, length, {}, socket, reply.id));
  } catch (const std::bad_alloc&) {
    munmap(reg->data, length);
    return Error(ENOMEM, "out of memory for a device mapping");
  }
}

DeviceMapping::~DeviceMapping() {
  // Unmap first: the owner forgets the mapping (and may free the memory)
  // only once no page of it can be reached from here.
  munmap(data_, length_);
  if (socket_ < 0) {
    if (auto region = region_.lock()) (void)region->detach(id_);
    return;
  }
  devmem::wire::Request req;
  req.op = devmem::wire::kUnmap;
  req.id = id_;
  if (!devmem::wire::send_packet(socket_, &req, sizeof req, -1)) return;
  devmem::wire::Reply reply;
  int fd = -1;
  pid_t pid = 0;
  devmem::wire::recv_packet(socket_, &reply, sizeof reply, &fd, &pid);
  if (fd >= 0) close(fd);
}

Status send_region(int socket, const ExportedRegion& region) {
  devmem::wire::Request req;
  req.op = devmem::wire::kExport;
  req.offset = region.offset;
  req.length = region.size;
  if (!devmem::wire::send_packet(socket, &req, sizeof req, region.fd)) {
    return Error(errno, "sending the device region");
  }
  return {};
}

Result<ExportedRegion> receive_region(int socket) {
  devmem::wire::Request req;
  int fd = -1;
  pid_t pid = 0;
  const int rc = devmem::wire::recv_packet(socket, &req, sizeof req, &fd, &pid);
  if (rc != 0) return Error(rc < 0 ? ECONNRESET : rc, "receiving a device region");
  if (req.magic != devmem::wire::kMagic || req.op != devmem::wire::kExport || fd < 0) {
    if (fd >= 0) close(fd);
    return Error(EPROTO, "not a device region export");
  }
  return ExportedRegion{fd, req.offset, req.length};
}

}  // namespace iomm
