// Virtqueue metadata cache: direct pointers to a split ring's descriptor
// table, available ring and used ring, kept valid by interval notifiers
// instead of pins (seed 002, vhost's "metadata acceleration").
//
// Contract
// - Ownership: the cache is a unique_ptr owned by the ring's consumer (one
//   data-path thread per ring). It keeps the Ioas alive and owns the three
//   IntervalNotifiers over the rings' IOVA ranges. It pins nothing and
//   charges nothing.
// - Addresses are IOVAs of the given Ioas (for vhost-user: the IOTLB's IOVA
//   space, or an Ioas mapping the front end's addresses). A ring may span
//   several mappings; each contiguous host run is cached separately.
// - Fast path: every accessor below is a plain load or store through the
//   cached pointer (acquire/release where the virtio spec orders them), with
//   no translation, no lock and no system call, inside an RCU read section.
// - Invalidation: a notifier callback marks the ring's pointers invalid. In
//   non-blocking mode it refuses (returns false) while the data path is
//   inside an access; in blocking mode it waits for that access (a grace
//   period), so no access uses a pointer after the callback returns. The
//   data path then falls back to translated, guarded copies through the
//   Ioas, and re-validates (looks the rings up again under the read_begin /
//   read_retry protocol) on a later access once the mappings are back.
// - Memory that is not the library's own mapping (user memory) is never
//   accessed through plain pointers: it is always copied with guarded
//   copies, and a copy that raced with an invalidation is discarded and
//   reported as EFAULT.
// - Not thread-safe on the data path: one thread per cache. The
//   invalidating thread may be any thread.
//
// Errors
// - ENOENT    part of a ring is not mapped in the Ioas (an IOTLB miss: the
//             caller may ask for the mapping and retry).
// - EFAULT    the memory behind a mapping is gone (unmapped, truncated), or a
//             copy raced with an invalidation.
// - EPERM     the used ring is mapped without write permission.
// - EINVAL    (create) size not a power of two in [1, 32768], misaligned
//             ring addresses (desc 16, avail 2, used 4), a ring range that
//             wraps.
#pragma once

#include <cstdint>
#include <memory>

#include "iomm/export.hpp"
#include "iomm/result.hpp"

namespace iomm {

class Ioas;

namespace vring {
struct CacheState;
}

// One descriptor of a split virtqueue (virtio 1.x, little-endian).
struct VringDesc {
  uint64_t addr = 0;
  uint32_t len = 0;
  uint16_t flags = 0;
  uint16_t next = 0;
};

inline constexpr uint16_t kVringDescFNext = 1;
inline constexpr uint16_t kVringDescFWrite = 2;
inline constexpr uint16_t kVringDescFIndirect = 4;

struct VringLayout {
  uint64_t desc_iova = 0;
  uint64_t avail_iova = 0;
  uint64_t used_iova = 0;
  uint16_t size = 0;
  // VIRTIO_RING_F_EVENT_IDX: the rings carry used_event / avail_event.
  bool event_idx = false;
};

struct VringCacheStats {
  uint64_t fast_accesses = 0;  // through cached pointers
  uint64_t slow_accesses = 0;  // translated copies
  uint64_t invalidations = 0;
  uint64_t revalidations = 0;  // pointers re-established
};

class IOMM_API VringCache {
 public:
  static Result<std::unique_ptr<VringCache>> create(const std::shared_ptr<Ioas>& ioas,
                                                    const VringLayout& layout);
  ~VringCache();
  VringCache(const VringCache&) = delete;
  VringCache& operator=(const VringCache&) = delete;

  // Available ring.
  Result<uint16_t> avail_flags();
  Result<uint16_t> avail_idx();                 // acquire: entries up to it are visible
  Result<uint16_t> avail_entry(uint16_t slot);  // ring[slot % size]
  Result<uint16_t> used_event();                // needs event_idx
  // Descriptor table.
  Result<VringDesc> desc(uint16_t index);  // EINVAL index >= size
  // Used ring.
  Status set_used_entry(uint16_t slot, uint32_t id, uint32_t len);
  Status set_used_idx(uint16_t idx);  // release: entries before it are visible
  Result<uint16_t> used_idx();
  Status set_used_flags(uint16_t flags);
  Status set_avail_event(uint16_t idx);  // needs event_idx

  [[nodiscard]] const VringLayout& layout() const noexcept;
  // Whether the next access can use cached pointers (all three rings valid).
  [[nodiscard]] bool cached() const noexcept;
  [[nodiscard]] VringCacheStats stats() const noexcept;

 private:
  explicit VringCache(std::unique_ptr<vring::CacheState> state);
  std::unique_ptr<vring::CacheState> state_;
};

}  // namespace iomm
