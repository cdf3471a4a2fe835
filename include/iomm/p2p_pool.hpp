// Peer-to-peer memory pools (seed 004): part of a device's memory handed out
// in reference-counted allocations that consumers map and other devices DMA
// into through an IOAS, and revoked when the device is unbound.
//
// Contract
// - Ownership: the device holds the P2pPool (shared_ptr). allocate() returns
//   a handle; the memory behind it is referenced by the handle, by every
//   consumer mapping of it (DeviceMapping on allocation->region()), by every
//   IOAS mapping made with map_into(), and by every hold(). It returns to
//   the pool only at the last reference: no mapping, pin or in-flight
//   reader can reach a block that is handed out again. Each allocation has
//   its own memfd, which is truncated when it is freed, so even a mapping
//   nobody told the pool about gets SIGBUS, never the next user's data.
// - Pool memory is never charged to memlock (as type1 never charges MMIO).
// - Long-term pins (an IOAS domain, an access pin) are refused with EPERM
//   unless they come through map_into(), which registers the IOAS mapping
//   so unbind can revoke it. unregistered_source() is the source anybody
//   else would get.
// - unbind() follows the seed's order: stop new allocations and faults;
//   wait an RCU grace period; zap every mapping (they survive; any access
//   gets SIGBUS); unmap every registered IOAS mapping (Ioas::unmap notifies
//   the accesses pinning it); wait, bounded, for the remaining references;
//   free. A reference still held when the wait ends fails the call with
//   ETIMEDOUT naming every holder (and the IOAS unmap errors, such as
//   EDEADLOCK from an access that would not unpin, that kept a
//   registration); calling unbind() again resumes. Destroying the pool unbinds it without waiting:
//   blocks still referenced are freed at their last reference.
// - Thread-safe. No pool lock is held while an IOAS is called.
//
// Errors
// - EINVAL   zero or unaligned size/length.
// - ENOSPC   no free range large enough.
// - ENODEV   the pool is being unbound or was unbound.
// - EPERM    a long-term pin without a revocation registration.
// - ETIMEDOUT references outlived unbind's wait (the message names them).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "iomm/device_region.hpp"
#include "iomm/export.hpp"
#include "iomm/ioas.hpp"
#include "iomm/result.hpp"
#include "iomm/source.hpp"

namespace iomm {

namespace devmem {
struct PoolState;
struct Block;
}  // namespace devmem

struct PoolOptions {
  std::string name = "iomm-p2p";
  uint64_t size = 0;  // multiple of 4 KiB
  Granularity granularity = Granularity::page;
};

struct PoolCounters {
  uint64_t capacity = 0;
  uint64_t allocated_bytes = 0;  // blocks not yet returned
  uint64_t allocations = 0;
  uint64_t references = 0;  // held references over all blocks (mappings, IOAS, holds)
  bool unbound = false;
};

// An in-flight reader's reference (a device reading the block, a pin):
// released on destruction.
class IOMM_API AllocationRef {
 public:
  AllocationRef(std::shared_ptr<devmem::Block> block, uint64_t id) noexcept
      : block_(std::move(block)), id_(id) {}
  AllocationRef(AllocationRef&& other) noexcept;
  AllocationRef& operator=(AllocationRef&& other) noexcept;
  ~AllocationRef();
  void release() noexcept;

 private:
  std::shared_ptr<devmem::Block> block_;
  uint64_t id_ = 0;
};

class IOMM_API P2pAllocation {
 public:
  explicit P2pAllocation(std::shared_ptr<devmem::Block> block) noexcept
      : block_(std::move(block)) {}
  ~P2pAllocation();
  P2pAllocation(const P2pAllocation&) = delete;
  P2pAllocation& operator=(const P2pAllocation&) = delete;

  [[nodiscard]] uint64_t pool_offset() const noexcept;
  [[nodiscard]] uint64_t length() const noexcept;
  // The allocation's memory as a region: export it, map it (shared only)
  // with DeviceMapping; each mapping holds a reference.
  [[nodiscard]] const std::shared_ptr<DeviceRegion>& region() const noexcept;

  // Map the allocation into an IOAS (whole), registered for revocation.
  Result<uint64_t> map_into(const std::shared_ptr<Ioas>& ioas, uint32_t prot,
                            std::optional<uint64_t> iova = std::nullopt);
  // Undo map_into. ENOENT if no such registration; the IOAS's errors.
  Status unmap_from(const std::shared_ptr<Ioas>& ioas, uint64_t iova);
  // A source without registration: mapping it works while no domain needs
  // a pin; every long-term pin of it fails with EPERM.
  Result<MemorySource> unregistered_source() const;

  // Take a named reference (an in-flight reader). ENODEV once unbinding.
  Result<AllocationRef> hold(std::string holder);
  [[nodiscard]] std::vector<std::string> holders() const;

 private:
  std::shared_ptr<devmem::Block> block_;
};

class IOMM_API P2pPool {
 public:
  static Result<std::shared_ptr<P2pPool>> create(const PoolOptions& options);
  explicit P2pPool(std::shared_ptr<devmem::PoolState> state) noexcept : state_(std::move(state)) {}
  ~P2pPool();
  P2pPool(const P2pPool&) = delete;
  P2pPool& operator=(const P2pPool&) = delete;

  // First fit. Length: non-zero multiple of 4 KiB.
  Result<std::shared_ptr<P2pAllocation>> allocate(uint64_t length);
  Status unbind(std::chrono::milliseconds wait = std::chrono::seconds(1));
  [[nodiscard]] PoolCounters counters() const;

 private:
  std::shared_ptr<devmem::PoolState> state_;
};

}  // namespace iomm
