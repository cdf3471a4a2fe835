// Device memory regions (seed 003): memory owned by a device emulator, mapped
// by consumers in this process or others, populated on first touch by the
// owner's fault service, and revoked when the device disables memory decode.
//
// Contract
// - Ownership: a DeviceRegion is held by shared_ptr by its owner (the device
//   model). It owns two memfds: the *view*, which it exports (fd, offset,
//   size) and which consumers map, and the *contents*, where the device's
//   data waits while memory is disabled. Destroying the region revokes it
//   (every mapping survives, every access then gets SIGBUS) and cannot fail.
// - Mapping: only MAP_SHARED. A private (copy-on-write) mapping would give a
//   consumer pages the device never sees; it is refused with EINVAL, by the
//   consumer API and again by the owner, which checks the consumer's VMA in
//   /proc/<pid>/maps before it serves it.
// - Faults: a consumer registers its mapping with a userfaultfd in minor
//   mode and hands the descriptor to the owner (DeviceMapping; over a unix
//   socket with SCM_RIGHTS for another process, as vhost-user postcopy
//   does). The owner's fault service installs the faulting granule (4 KiB, or
//   the 2 MiB chunk around it, clipped to the mapping) with UFFDIO_CONTINUE.
//   Concurrent faults on one page, from any number of threads and
//   processes, are normal: a page already installed (EEXIST) is skipped and
//   its waiters woken; every installed PTE maps the region's own page, and
//   nothing the service records depends on an install having succeeded.
// - Memory enable (the PCI command register's memory bit): disabling saves
//   the view into the contents and truncates the view to 0. Truncation zaps
//   the region's pages from every mapping of the file in every process (also
//   forked children and mappings nobody registered) and makes every later
//   access SIGBUS; the mappings themselves survive. Enabling writes the
//   contents back in order, growing the file as it goes, so a page becomes
//   reachable only once it holds the device's data. Contents survive a
//   disable/enable cycle unless reset() clears them.
// - Locking: the enable state is read by the fault service under the
//   region's state lock (shared) around its check and its UFFDIO_CONTINUE,
//   and changed under it (exclusive), so no fault installs a page once a
//   disable has begun. A store a consumer makes to an already-installed
//   page while a disable is saving the view may be lost (see docs/design.md,
//   "Device memory").
//
// Errors
// - EINVAL   zero or unaligned size/offset/length; range past the region;
//            a private mapping.
// - ENODEV   the region was revoked (its pool was unbound).
// - ENOTSUP  the kernel has no userfaultfd minor faults on shmem.
// - EPERM    userfaultfd refused (vm.unprivileged_userfaultfd=0 and no
//            user-mode-only support).
// - ENOMEM, ENOSPC, EMFILE from memfd_create, fallocate and friends.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "iomm/export.hpp"
#include "iomm/result.hpp"

namespace iomm {

namespace devmem {
struct RegionState;
}

// How much one fault installs.
enum class Granularity : uint64_t {
  page = 4096,                // the faulting 4 KiB page
  huge = 2ULL * 1024 * 1024,  // the 2 MiB-aligned chunk around it
};

struct RegionOptions {
  std::string name = "iomm-device";
  uint64_t size = 0;  // multiple of 4 KiB
  Granularity granularity = Granularity::page;
};

// What a consumer needs to map the region: fd (borrowed from the region, or
// owned by whoever received it with receive_region), offset and size.
struct ExportedRegion {
  int fd = -1;
  uint64_t offset = 0;
  uint64_t size = 0;
};

// Updated by the fault service after it answers a fault: a counter may lag
// the touch that caused it by the service's last few instructions.
struct RegionCounters {
  uint64_t faults = 0;           // fault events read from consumers' userfaultfds
  uint64_t installed_bytes = 0;  // bytes installed with UFFDIO_CONTINUE
  uint64_t already_mapped = 0;   // pages found installed by a concurrent fault (EEXIST)
  uint64_t refused = 0;          // faults answered with SIGBUS (disabled or revoked)
  uint64_t mappings = 0;         // consumer mappings registered now
  bool enabled = true;
  bool revoked = false;
  bool poison = false;  // refusals of a revoked region use UFFDIO_POISON
};

struct ConsumerMappingInfo {
  uint64_t id;
  int pid;
  uint64_t address;
  uint64_t offset;
  uint64_t length;
};

class IOMM_API DeviceRegion {
 public:
  static Result<std::shared_ptr<DeviceRegion>> create(const RegionOptions& options);
  ~DeviceRegion();
  DeviceRegion(const DeviceRegion&) = delete;
  DeviceRegion& operator=(const DeviceRegion&) = delete;

  [[nodiscard]] ExportedRegion exported() const noexcept;
  [[nodiscard]] uint64_t size() const noexcept;
  [[nodiscard]] Granularity granularity() const noexcept;

  // The device's own access to its memory (enabled or not). ENODEV once
  // revoked; EINVAL out of range.
  Status read(uint64_t offset, void* buf, size_t length) const;
  Status write(uint64_t offset, const void* buf, size_t length);

  // Memory decode on/off (see the contract). Idempotent. A failed enable or
  // disable (ENOMEM, ENOSPC) leaves the state and the contents as they were.
  Status set_memory_enabled(bool enabled);
  [[nodiscard]] bool memory_enabled() const noexcept;
  // Device reset: the contents become zeros (mapped pages are zapped first).
  Status reset();

  // Serve the consumer at the other end of a connected SOCK_SEQPACKET unix
  // socket (DeviceMapping::map_remote). Takes ownership of the socket; when
  // the consumer hangs up, its mappings are forgotten (the size gate still
  // covers them).
  Status serve(int socket);

  [[nodiscard]] RegionCounters counters() const;
  [[nodiscard]] std::vector<ConsumerMappingInfo> mappings() const;

  // Internal.
  devmem::RegionState& state() noexcept { return *state_; }
  explicit DeviceRegion(std::shared_ptr<devmem::RegionState> state);

 private:
  std::shared_ptr<devmem::RegionState> state_;
};

enum class MapMode {
  shared,
  // MAP_PRIVATE: always refused (EINVAL), named so callers can say what they
  // wanted and get a clear error.
  private_copy_on_write,
};

// Consumer side: one mapping of [offset, offset + length) of a region,
// registered with a userfaultfd in minor mode whose descriptor the owner
// holds. Destroying it unmaps it and then tells the owner.
class IOMM_API DeviceMapping {
 public:
  // In this process: the descriptor goes to the region directly.
  static Result<std::unique_ptr<DeviceMapping>> map(const std::shared_ptr<DeviceRegion>& region,
                                                    uint64_t offset, uint64_t length,
                                                    MapMode mode = MapMode::shared);
  // In another process: region.fd is mapped here, the descriptor goes to
  // the owner over `socket` (a connected SOCK_SEQPACKET socket the owner
  // serves, not owned) with SCM_RIGHTS, and the owner's verdict comes back.
  static Result<std::unique_ptr<DeviceMapping>> map_remote(int socket, const ExportedRegion& region,
                                                           uint64_t offset, uint64_t length,
                                                           MapMode mode = MapMode::shared);
  ~DeviceMapping();
  DeviceMapping(const DeviceMapping&) = delete;
  DeviceMapping& operator=(const DeviceMapping&) = delete;

  [[nodiscard]] std::byte* data() const noexcept { return data_; }
  [[nodiscard]] uint64_t length() const noexcept { return length_; }
  [[nodiscard]] uint64_t offset() const noexcept { return offset_; }

 private:
  DeviceMapping(std::byte* data, uint64_t offset, uint64_t length,
                std::weak_ptr<devmem::RegionState> region, int socket, uint64_t id)
      : data_(data),
        offset_(offset),
        length_(length),
        region_(std::move(region)),
        socket_(socket),
        id_(id) {}

  std::byte* data_;
  uint64_t offset_;
  uint64_t length_;
  std::weak_ptr<devmem::RegionState> region_;  // in-process
  int socket_;                                 // remote (-1 in-process)
  uint64_t id_;
};

// Hand a region's fd, offset and size to the process at the other end of a
// unix socket (SCM_RIGHTS), before serving it; receive_region returns an fd
// the receiver owns.
IOMM_API Status send_region(int socket, const ExportedRegion& region);
IOMM_API Result<ExportedRegion> receive_region(int socket);

}  // namespace iomm
