// Invalidating a range of a backing object's offsets: the entry point of
// event sources outside the IOAS (the userfaultfd monitor, truncation
// detection, device-memory revocation).
//
// Call with no iomm lock held: the callbacks run on the calling thread and
// may take IOAS locks (an on-demand mapping drops its translations) or call
// read-only entry points. Never from inside an RCU read section (a callback
// may wait for a data-path thread that is waiting for this one). Allocates
// nothing and cannot fail.
#pragma once

#include "iomm/notifier.hpp"
#include "mem/mem_object.hpp"
#include "notify/registry.hpp"

namespace iomm::notify {

// An event that has already happened (the memory is gone): every notifier
// of `object` overlapping `offsets` is called, and the invalidation ends
// when this returns.
void invalidate_source(mem::MemObject& object, const IovaRange& offsets,
                       InvalidationCause cause) noexcept;

// An event the caller is about to make happen (revoking device memory,
// truncating): notifiers are called in the constructor, and read_begin of
// the notifiers it reached waits until the destructor, so run the event in
// between.
class SourceInvalidation {
 public:
  SourceInvalidation(mem::MemObject& object, const IovaRange& offsets,
                     InvalidationCause cause) noexcept;
  ~SourceInvalidation() = default;
  SourceInvalidation(const SourceInvalidation&) = delete;
  SourceInvalidation& operator=(const SourceInvalidation&) = delete;

 private:
  Window window_;
};

}  // namespace iomm::notify
