// Accesses: mediated users of an IOAS (seed 001; iommufd_access, type1 mdev).
//
// Contract
// - An access is attached to one IOAS for its whole life and keeps it alive.
// - pin() makes an IOVA range resident and returns host pointers; the pages
//   stay pinned (and charged once, to the mapping's owner) until unpin() with
//   exactly the same iova and length, or until the access is destroyed.
// - read()/write() copy by IOVA, byte-granular, with no long-term pin. A
//   write marks the pages in the IOAS's dirty log while tracking is on.
// - pin(), pin_pages() and rw fail with EBUSY while the mapping's host
//   address is invalid (Ioas::invalidate_host, live update).
// - The unmap callback is mandatory. Before an unmap removes a range this
//   access holds pinned, the callback is called with the range being
//   unmapped (once per contiguous run of the mappings removed), with no IOAS
//   lock held, from the unmapping thread. It must unpin every pin it holds
//   that intersects the range before it returns (it may call unpin()
//   directly). Only accesses whose pins, held or in flight (pin() or
//   pin_pages() not yet returned), overlap the range are called. A pin that
//   is still locking pages when the unmap starts is waited for (Ioas::unmap,
//   IoasOptions::unmap_pin_wait_ms); after kUnmapNotifyRetries rounds that
//   release nothing, the unmap fails with EDEADLOCK. While a range is being
//   unmapped, new pins and rw of it fail with EINVAL.
// - The callback is the access's part of the IOAS's invalidation of the
//   range (an interval notifier over the IOAS, include/iomm/notifier.hpp):
//   it runs while that invalidation is open, so it must not wait in
//   IntervalNotifier::read_begin of a notifier over the range.
// - Locking: no access or IOAS lock is held while pages are locked, so a
//   slow pin (a huge range, a page fault served by userfaultfd) does not
//   hold up unmap notification or dirty reads (lock order: docs/design.md,
//   "Lock order").
// - Serialise your own pin-and-record against your callback with your own
//   lock; the callback can run while pin() is still returning.
// - Destroying the access unpins everything it still holds; it cannot fail.
//   It waits for a callback already running, so do not drop the last
//   reference to the access from inside its own callback.
//
// Errors
// - EINVAL  no callback; zero length; misaligned pin; unpin with no exact
//           match; range being unmapped.
// - EOVERFLOW range wraps.
// - ENOENT  part of the range is not mapped.
// - EPERM   prot not allowed by the mapping.
// - EFAULT, ENOMEM, ENXIO from pinning or copying.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "iomm/export.hpp"
#include "iomm/ioas.hpp"
#include "iomm/result.hpp"

namespace iomm {

namespace access {
struct AccessState;
}

// Called with an inclusive IOVA range being unmapped (a contiguous run of
// the mappings being removed), so the whole 64-bit space is expressible.
using UnmapCallback = std::function<void(const IovaRange& range)>;

struct IOMM_API PinnedSegment {
  uint64_t iova;
  uint64_t length;
  void* host;  // nullptr for simulated memory
};

class IOMM_API Access {
 public:
  // Attaching raises the IOAS's IOVA alignment to 4 KiB (EADDRINUSE if a
  // mapping breaks it).
  static Result<std::shared_ptr<Access>> create(const std::shared_ptr<Ioas>& ioas,
                                                UnmapCallback on_unmap);
  ~Access();
  Access(const Access&) = delete;
  Access& operator=(const Access&) = delete;

  // Pin a page-aligned range; one segment per mapping it crosses.
  Result<std::vector<PinnedSegment>> pin(uint64_t iova, uint64_t length, uint32_t prot);
  Status unpin(uint64_t iova, uint64_t length);

  // Per-page pins with a reference count per page (the model of type1's
  // vfio_pin_pages): pin_pages raises the count of each of npages pages from
  // iova, pinning (and charging) a page when its count leaves 0, and writes
  // each page's host address to host[i]. unpin_pages lowers the counts and
  // releases a page when its count returns to 0; any page can be unpinned on
  // its own. Both are all-or-nothing. Page pins take part in the unmap
  // protocol like range pins. Metadata: one 4-byte count per page, in chunks
  // of 16 pages.
  // Errors: EINVAL zero npages, null host, misaligned iova, range being
  // unmapped, unpin of a page not pinned; EOVERFLOW wrap; ENOENT a page not
  // mapped; EPERM prot not allowed; EBUSY host address being updated (live
  // update); EFAULT/ENOMEM from pinning.
  Status pin_pages(uint64_t iova, uint64_t npages, uint32_t prot, void** host);
  Status unpin_pages(uint64_t iova, uint64_t npages);
  [[nodiscard]] uint64_t page_pinned_count() const;

  Status read(uint64_t iova, void* buf, size_t length);
  Status write(uint64_t iova, const void* buf, size_t length);

  [[nodiscard]] uint64_t pinned_bytes() const;
  [[nodiscard]] uint64_t pin_count() const;

 private:
  explicit Access(std::unique_ptr<access::AccessState> state);
  std::unique_ptr<access::AccessState> state_;
};

}  // namespace iomm
