#include "iomm/source.hpp"

#include <string>

#include "iomm/range.hpp"
#include "iomm/signals.hpp"
#include "mem/file_object.hpp"
#include "mem/simulated_object.hpp"

namespace iomm {

Result<MemorySource> MemorySource::from_file(int fd, uint64_t offset, uint64_t length,
                                             FileSeal seal) {
  // Before the file is mapped: copies into the mapping rely on the handler.
  install_signal_handlers();
  auto range = mem::FileObject::for_range(fd, offset, length, seal);
  if (!range.ok()) return range.error();
  return MemorySource(std::move(range->object), offset, length, range->writable);
}

Result<MemorySource> MemorySource::from_user(void* address, uint64_t length, bool writable) {
  if (length == 0) return Error(EINVAL, "zero length");
  // Inclusive last: a range may end at the very top of the address space.
  if (!make_range(reinterpret_cast<uint64_t>(address), length)) {
    return Error(EOVERFLOW, "address + length wraps past the top of the address space");
  }
  return MemorySource(mem::user_object(), reinterpret_cast<uint64_t>(address), length, writable);
}

Result<MemorySource> MemorySource::simulated(uint64_t length) {
  if (length == 0) return Error(EINVAL, "zero length");
  if (length > mem::kSimulatedMaxLength) {
    return Error(EINVAL, "a simulated source is at most " +
                             std::to_string(mem::kSimulatedMaxLength) + " bytes");
  }
  auto obj = mem::make_simulated_object();
  if (!obj.ok()) return obj.error();
  return MemorySource(std::move(obj).value(), 0, length, true);
}

SourceKind MemorySource::kind() const noexcept { return object_->kind(); }

uint64_t MemorySource::page_size() const noexcept { return 1ULL << object_->page_shift(); }

bool MemorySource::shrink_sealed() const noexcept { return object_->shrink_sealed(); }

uint64_t MemorySource::discarded_pages() const noexcept {
  if (object_->kind() != SourceKind::file) return 0;
  return static_cast<const mem::FileObject&>(*object_).discarded_pages();
}

MemorySource MemorySource::read_only() const {
  return MemorySource(object_, offset_, length_, false);
}

void* MemorySource::host_address() const noexcept { return object_->host(offset_); }

MemorySource MemorySource::slice(uint64_t skip, uint64_t length) const {
  return MemorySource(object_, offset_ + skip, length, writable_);
}

}  // namespace iomm
