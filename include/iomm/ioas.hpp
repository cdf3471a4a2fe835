// I/O address spaces (seed 001; iommufd IOAS semantics).
//
// Contract
// - Ownership: an Ioas is held by shared_ptr. It owns its mappings (areas),
//   holds the domains attached to it, and is kept alive by its accesses.
//   Destroying it unmaps everything (notifying accesses first) and detaches
//   every domain; destruction cannot fail.
// - Lazy pinning: a mapping pins nothing while the IOAS has no domain. The
//   first attached domain pins every mapping; accesses pin what they ask for.
// - All-or-nothing: map, copy, attach and unmap either fully happen or leave
//   no area, pin, charge or translation behind.
// - Unmap never splits a mapping: every mapping touching the range must lie
//   inside it (ENOENT otherwise); holes are fine. Translations are removed
//   from every domain, then readers are waited for, then pages are unpinned,
//   then the charge is returned.
// - Accesses holding pins in a range being unmapped are told to unpin through
//   their callback, with no IOAS lock held, round after round. Only rounds
//   that make no progress count: a round that releases pins does not, and
//   while a pin of the range is still locking pages (in flight) the unmap
//   waits for it to finish, up to IoasOptions::unmap_pin_wait_ms in all.
//   After kUnmapNotifyRetries rounds without progress (about 0.1 s of
//   back-off), or when the in-flight wait runs out, the unmap fails with
//   EDEADLOCK and nothing is unmapped.
// - Locking: concurrent calls are safe. Maps and unmaps of disjoint ranges
//   take the tree lock only to reserve and publish; pinning and page-table
//   filling run outside it. Attach/detach exclude fills. The order of every
//   lock is in docs/design.md, "Lock order".
//
// Errors (iommufd's, see docs/design.md for the table)
// - EOVERFLOW iova or length is UINT64_MAX, or iova + length wraps.
// - EINVAL    no R/W prot; zero length; misaligned iova/length/offset;
//             fixed IOVA inside a reserved range.
// - EEXIST    fixed IOVA overlaps a mapping.
// - ENOSPC    mapping limit reached, or no free IOVA for an allocation.
// - EPERM     write prot on a read-only source.
// - ENOENT    unmap range cuts a mapping or unmaps nothing; copy source not
//             fully mapped.
// - EBUSY     unmap of a mapping still being created or removed.
// - EADDRINUSE reserved/allowed ranges overlap mappings or each other;
//             raising the alignment conflicts with a mapping.
// - EFAULT, ENOMEM from pinning (bad address; memlock limit).
// - ESRCH     the owner named by an OwnerSpec is not a live process.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "iomm/accounting.hpp"
#include "iomm/domain.hpp"
#include "iomm/export.hpp"
#include "iomm/external_domain.hpp"
#include "iomm/range.hpp"
#include "iomm/result.hpp"
#include "iomm/source.hpp"

namespace iomm {

namespace ioas {
struct IoasState;
struct Internals;
}  // namespace ioas

inline constexpr uint32_t kDefaultMaxMappings = 65535;
inline constexpr int kUnmapNotifyRetries = 100;

struct IOMM_API IoasOptions {
  AccountMode account_mode = AccountMode::per_process;
  uint32_t max_mappings = kDefaultMaxMappings;
  // Whose budget pays for this IOAS's pins (default: this process / its uid).
  OwnerSpec owner{};
  // How long, in all, an unmap waits for access pins of its range that are
  // still locking pages (a large pin in mlock, or one stuck in a page fault)
  // before it gives up with EDEADLOCK.
  uint32_t unmap_pin_wait_ms = 10000;
};

struct IOMM_API MappingInfo {
  uint64_t iova;
  uint64_t length;
  uint32_t prot;
  SourceKind kind;
  bool pinned;           // held by the IOAS's domains
  uint32_t access_pins;  // access pins overlapping it
};

struct IOMM_API IoasCounters {
  uint64_t mappings = 0;
  uint64_t mapped_bytes = 0;
  uint64_t domains = 0;
  uint64_t accesses = 0;
  uint64_t iova_alignment = 1;
};

class Access;

class IOMM_API Ioas : public std::enable_shared_from_this<Ioas> {
 public:
  static Result<std::shared_ptr<Ioas>> create(const IoasOptions& options = {});
  ~Ioas();
  Ioas(const Ioas&) = delete;
  Ioas& operator=(const Ioas&) = delete;

  // Map the whole source with prot (kProtRead | kProtWrite). With iova set,
  // map exactly there; otherwise allocate (first fit, never 0, aligned to the
  // smaller of roundup_pow2(length) and the lowest set bit of the backing
  // address, keeping its offset within the page). Returns the IOVA.
  Result<uint64_t> map(const MemorySource& source, uint32_t prot,
                       std::optional<uint64_t> iova = std::nullopt);
  // map(), charging `owner` instead of IoasOptions::owner.
  Result<uint64_t> map_as(const MemorySource& source, uint32_t prot, std::optional<uint64_t> iova,
                          const OwnerSpec& owner);

  // An on-demand (unpinned) mapping: nothing is pinned or charged, now or
  // when a domain is attached. Domains translate through it while its memory
  // is there; the mapping's translations are dropped when an interval
  // notifier event (munmap, discard, truncate of its source) invalidates
  // the memory, a DMA then faults cleanly (EFAULT, FaultReason::not_present)
  // and translates again once the memory is back. Accesses may not pin it
  // (EINVAL); they read and write it with guarded copies. Errors as map().
  Result<uint64_t> map_on_demand(const MemorySource& source, uint32_t prot,
                                 std::optional<uint64_t> iova = std::nullopt);

  // Host addresses of [iova, iova + length) for a consumer that keeps them
  // under an IntervalNotifier (iomm/notifier.hpp) instead of a pin: one
  // segment per run of contiguous host memory, in IOVA order. Valid until
  // the notifier's next invalidation; nothing is pinned or charged.
  // ENOENT part of the range is not mapped (or being created or removed);
  // EPERM prot not allowed; ENXIO simulated memory; EBUSY host address
  // invalid (live update); EOVERFLOW wrap; EINVAL zero length.
  struct HostSegment {
    uint64_t iova;
    uint64_t length;
    void* host;
    // The memory is the library's own mapping of a file (stable while the
    // mapping lives: plain loads and stores are safe unless the file
    // shrinks) rather than this process's user memory (copy with guarded
    // copies only).
    bool library_mapped;
  };
  Result<std::vector<HostSegment>> host_segments(uint64_t iova, uint64_t length,
                                                 uint32_t prot) const;
  // The same, appended to `out`, so a data path reuses its vector's
  // capacity instead of allocating per call. Runs are merged only within
  // this call's range. On failure `out` is as it was.
  Status host_segments(uint64_t iova, uint64_t length, uint32_t prot,
                       std::vector<HostSegment>& out) const;

  // Unmap every mapping inside [iova, iova + length). Returns bytes unmapped.
  Result<uint64_t> unmap(uint64_t iova, uint64_t length);
  // Unmap every mapping. Allocates nothing, so it cannot fail for lack of
  // memory; fails with EDEADLOCK if an access refuses to unpin, or EBUSY if
  // a mapping is being created or removed concurrently. Returns bytes
  // unmapped.
  Result<uint64_t> unmap_all();
  // Like unmap, but an empty range succeeds with 0 (type1 / compat rule).
  Result<uint64_t> unmap_range_allow_empty(uint64_t iova, uint64_t length);
  // unmap_range_allow_empty that also ORs the dirty-log bits of what it
  // removes into bitmap (bit i = 4 KiB page (bitmap_iova >> 12) + i; pages
  // outside the bitmap are dropped). They are read after the translations
  // are gone and every writer has finished, just before the log is cleared,
  // so no write in between is lost. On failure nothing is read and the log
  // keeps its bits.
  Result<uint64_t> unmap_collecting_dirty(uint64_t iova, uint64_t length, uint64_t bitmap_iova,
                                          std::span<uint64_t> bitmap);

  // Map [src_iova, src_iova + length) of src here, sharing the source's
  // pinned pages: no new pin and no new charge. The source range must be
  // covered by contiguous, fully created mappings (ENOENT).
  Result<uint64_t> copy_from(Ioas& src, uint64_t src_iova, uint64_t length, uint32_t prot,
                             std::optional<uint64_t> iova = std::nullopt);

  // Allowed ranges restrict IOVA allocation only. Replaces the whole list.
  // EINVAL: start > last or ranges overlap each other; EADDRINUSE: overlaps a
  // reserved range.
  Status set_allowed_ranges(std::span<const IovaRange> ranges);
  // Reserve a range for the user. EINVAL start > last; EADDRINUSE overlaps a
  // mapping or an allowed range.
  Status add_reserved(const IovaRange& range);
  // Remove a user reservation added by add_reserved; ENOENT if none matches.
  Status remove_reserved(const IovaRange& range);
  // The usable IOVA ranges: holes between reserved ranges.
  [[nodiscard]] std::vector<IovaRange> iova_ranges() const;

  // Attach a domain: reserves its aperture complement and reserved regions,
  // raises the IOVA alignment to its minimum page size, pins every mapping
  // (if it is the first domain) and fills its page table.
  // EBUSY attached elsewhere; EINVAL already attached here;
  // EADDRINUSE an existing mapping or allowed range falls outside the
  // aperture, in a reserved region, or breaks the new alignment;
  // EFAULT/ENOMEM from pinning.
  Status attach(const std::shared_ptr<SoftDomain>& domain);
  // Detach: clears the domain's page table and unpins what no one else
  // holds. ENOENT if not attached here.
  Status detach(const std::shared_ptr<SoftDomain>& domain);
  // Attach a domain whose page table lives elsewhere (the kernel's VFIO
  // container, iomm/kernel_vfio.hpp; contract in iomm/external_domain.hpp):
  // reserves the complement of its usable ranges, raises the alignment to
  // its page size and maps every mapping into it. It pins what it maps
  // itself: the IOAS pins nothing for it. All or nothing; its map errors
  // come back unchanged. EINVAL no domain or already attached here;
  // EADDRINUSE as attach().
  Status attach_external(const std::shared_ptr<ExternalDomain>& domain);
  // Unmaps every mapping from it and drops its reservations; ENOENT if not
  // attached here.
  Status detach_external(const std::shared_ptr<ExternalDomain>& domain);

  // Dirty tracking. While on, writes through attached domains' DMA and
  // through accesses mark their 4 KiB IOVA pages in a log. Turning it on or
  // off clears the log; unmapping clears the unmapped range. Turning it on
  // returns only once every write that began before and may have missed the
  // switch has finished (a grace period for DMA, the tree lock for
  // accesses): every write that completes after the call is in the log.
  void set_dirty_tracking(bool on) noexcept;
  [[nodiscard]] bool dirty_tracking() const noexcept;
  // Fill bitmap (bit i = 4 KiB page (iova >> 12) + i) with the pages written
  // since the last call, plus every page an access holds pinned (reported
  // until unpinned); clears the log for the range. The bitmap is zeroed
  // first. EINVAL: tracking off, iova/length not page aligned, zero length,
  // bitmap too small; EOVERFLOW: wrap.
  Status read_and_clear_dirty(uint64_t iova, uint64_t length, std::span<uint64_t> bitmap);
  // The same, leaving the log as it is: for a monitor that must not take
  // bits from whoever collects them (a migration).
  Status peek_dirty(uint64_t iova, uint64_t length, std::span<uint64_t> bitmap);

  // Live update. invalidate_host marks every mapping inside the range (none
  // may be cut: ENOENT) as having no valid host address: domains keep
  // translating, accesses' pins and rw fail with EBUSY. EINVAL if one is
  // already invalid (nothing changed); EBUSY if one is being created or
  // removed. Returns the bytes invalidated (0 for an empty range).
  Result<uint64_t> invalidate_host(uint64_t iova, uint64_t length);
  // Install a new source for the invalidated mapping starting at iova, with
  // the same length, owned by `owner`. EOPNOTSUPP if an external domain is
  // attached and the new source is other memory (its mapping would have to
  // be redone outside the IOAS). If domains hold the mapping, the new
  // source and owner are pinned and charged first (ENOMEM, EFAULT), the
  // domains are switched to it, readers are waited for, and the old pin and
  // charge are released. Same backing object and offset: no re-pin, only
  // the charge moves if the owner changed. ENOENT no mapping starts at iova;
  // EINVAL not invalid, length differs, an on-demand mapping, or the new
  // backing address does not fit the IOAS's IOVA alignment (as map()
  // requires); EBUSY accesses hold pins in it.
  Status replace_host(uint64_t iova, const MemorySource& source, const OwnerSpec& owner);
  // Mappings whose host address is invalid.
  [[nodiscard]] uint64_t invalid_host_count() const;

  [[nodiscard]] std::vector<MappingInfo> mappings() const;
  [[nodiscard]] IoasCounters counters() const;
  [[nodiscard]] const IoasOptions& options() const noexcept;

 private:
  friend struct ioas::Internals;  // src/ioas/ioas_state.hpp
  explicit Ioas(std::unique_ptr<ioas::IoasState> state);
  std::unique_ptr<ioas::IoasState> state_;
};

}  // namespace iomm
