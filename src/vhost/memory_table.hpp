// The guest memory the front end shares with SET_MEM_TABLE: each region an
// iomm file source over the fd received with it, mapped at its
// guest-physical address in the table's own address space.
//
// Contract
// - Ownership: the table owns its sources (which keep the library's
//   mapping of each file alive) and its GPA address space; the received fds
//   are closed once the sources are made (the sources hold their own).
//   Dropping the table releases everything; nothing was pinned or charged.
// - Seals: regions are taken with FileSeal::allow_shrink. QEMU's memfd
//   backend seals its memfds against shrinking, but a memory-backend-file
//   (or another front end) need not, and the back end never pins: ring
//   accesses to such a file are guarded copies and data buffers are only
//   handed to preadv/pwritev (see address_space.hpp), so a file shrunk under
//   it gives EFAULT (a failed request), never SIGBUS.
// - create() is all-or-nothing. Errors: EINVAL more than kMaxMemRegions, a
//   fd count different from the region count, a zero-sized region, regions
//   overlapping in guest-physical or front-end address space, a region the
//   Ioas cannot map (not page aligned); EOVERFLOW a region that wraps;
//   errors of MemorySource::from_file (EBADF, ENODEV, EINVAL past the end of
//   the file).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "iomm/result.hpp"
#include "iomm/source.hpp"
#include "vhost/address_space.hpp"
#include "vhost/protocol.hpp"
#include "vhost/unique_fd.hpp"

namespace iomm::vhost {

struct GuestRegion {
  uint64_t gpa = 0;
  uint64_t size = 0;
  uint64_t uaddr = 0;  // the front end's virtual address of the region
  MemorySource source;
};

// A piece of front-end address space, resolved to the region backing it.
struct UaddrPiece {
  const GuestRegion* region;
  uint64_t offset;  // into the region
  uint64_t length;
};

class MemoryTable {
 public:
  static Result<MemoryTable> create(std::span<const MemRegion> regions, std::vector<UniqueFd> fds);

  [[nodiscard]] const std::vector<GuestRegion>& regions() const noexcept { return regions_; }
  [[nodiscard]] const AddressSpace& gpa_space() const noexcept { return space_; }
  // The guest-physical address of a front-end virtual address, if a region
  // holds it.
  [[nodiscard]] std::optional<uint64_t> uaddr_to_gpa(uint64_t uaddr) const noexcept;
  // [uaddr, uaddr + length) split at region boundaries; ENOENT where no
  // region holds a byte of it, EOVERFLOW if it wraps, EINVAL zero length.
  [[nodiscard]] Result<std::vector<UaddrPiece>> resolve_uaddr(uint64_t uaddr,
                                                              uint64_t length) const;

 private:
  MemoryTable(std::vector<GuestRegion> regions, AddressSpace space)
      : regions_(std::move(regions)), space_(std::move(space)) {}
  std::vector<GuestRegion> regions_;
  AddressSpace space_;
};

}  // namespace iomm::vhost
