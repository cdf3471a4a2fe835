#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <new>
#include <optional>

#include "domain/page_table.hpp"
#include "domain/soft_domain_impl.hpp"
#include "fault/inject.hpp"
#include "iomm/domain.hpp"
#include "iomm/rcu.hpp"
#include "iomm/signals.hpp"
#include "mem/checked_copy.hpp"
#include "mem/host_access.hpp"
#include "mem/safe_copy.hpp"
#include "sync/rcu.hpp"

namespace iomm {

namespace domain {

void FaultLog::record(const IommuFault& fault) noexcept {
  total_.fetch_add(1, std::memory_order_relaxed);
  const std::lock_guard lock(mutex_);
  if (size_ == capacity_) {
    dropped_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  ring_[(head_ + size_) % capacity_] = fault;
  ++size_;
}

std::vector<IommuFault> FaultLog::drain() {
  const std::lock_guard lock(mutex_);
  std::vector<IommuFault> faults;
  faults.reserve(size_);
  for (size_t i = 0; i < size_; ++i) faults.push_back(ring_[(head_ + i) % capacity_]);
  head_ = 0;
  size_ = 0;
  return faults;
}

}  // namespace domain

namespace {

constexpr uint64_t kSupportedPageSizes = kPageSize | kPageSize2M | kPageSize1G;

bool inside_aperture(const DomainConfig& config, uint64_t iova) {
  return iova >= config.aperture_start && iova <= config.aperture_last;
}

Error record_fault(domain::FaultLog& faults, uint64_t iova, uint32_t access, FaultReason reason) {
  faults.record(IommuFault{.iova = iova, .requested = access, .reason = reason});
  switch (reason) {
    case FaultReason::outside_aperture:
      return Error(EFAULT, "IOMMU fault: IOVA outside the aperture");
    case FaultReason::not_present:
      return Error(EFAULT, "IOMMU fault: IOVA not mapped");
    case FaultReason::host_memory:
      return Error(EFAULT,
                   "IOMMU fault: the memory behind the mapping is gone (user memory unmapped or "
                   "protected, or a file shrunk)");
    case FaultReason::permission:
      break;
  }
  return Error(EPERM, "IOMMU fault: mapping does not allow this access");
}

// Host side of one DMA, in IOVA order. A DMA usually crosses a few leaves
// whose host pages are contiguous, so segments merge and live on the stack;
// only long transfers over scattered memory spill to the heap.
class HostSegments {
 public:
  struct Segment {
    uint64_t address;
    size_t bytes;
    mem::HostAccess access;
  };

  // False when spilling to the heap fails.
  bool append(uint64_t address, size_t bytes, mem::HostAccess access) noexcept {
    if (count_ > 0) {
      Segment& tail = (*this)[count_ - 1];
      if (tail.address + tail.bytes == address && tail.access == access) {
        tail.bytes += bytes;
        return true;
      }
    }
    if (count_ < kInline) {
      inline_[count_] = Segment{address, bytes, access};
    } else {
      try {
        spilled_.push_back(Segment{address, bytes, access});
      } catch (const std::bad_alloc&) {
        return false;
      }
    }
    ++count_;
    return true;
  }

  [[nodiscard]] size_t size() const noexcept { return count_; }
  Segment& operator[](size_t i) noexcept {
    return i < kInline ? inline_[i] : spilled_[i - kInline];
  }

 private:
  static constexpr size_t kInline = 32;
  Segment inline_[kInline];  // only the first count_ entries are set
  size_t count_ = 0;
  std::vector<Segment> spilled_;
};

// One segment of a DMA between the device buffer and host memory, by the
// way the memory behind the leaf can be reached. False when the memory is
// gone: a file that shrank (SIGBUS caught), or user memory the caller
// unmapped or protected (process_vm_readv/writev report it).
bool copy_from_host(const HostSegments::Segment& segment, std::byte* buf) noexcept {
  if (segment.access == mem::HostAccess::checked) {
    return mem::checked_read(buf, segment.address, segment.bytes);
  }
  return mem::safe_copy(buf, reinterpret_cast<const void*>(segment.address), segment.bytes);
}

bool copy_to_host(const HostSegments::Segment& segment, const std::byte* buf) noexcept {
  if (segment.access == mem::HostAccess::checked) {
    return mem::checked_write(segment.address, buf, segment.bytes);
  }
  return mem::safe_copy(reinterpret_cast<void*>(segment.address), buf, segment.bytes);
}

// Checks the whole of [iova, iova + length) for `access` and collects its
// host segments, marks the range in dirty_log (when given) and then calls
// copy(segment, offset_in_buf) for each segment. Marking comes before
// the first byte moves: a page reported dirty but not written is harmless,
// a written page missing from the log is lost by a migration. The caller's
// RCU read section spans it all, so the collected host pointers stay valid
// until the last byte has moved. Memory found gone during the copy is recorded as a
// host_memory fault at the IOVA of the failing segment.
template <typename CopyFn>
Status transfer(const DomainConfig& config, const domain::PageTable& table,
                domain::FaultLog& faults, domain::MissResolver* resolver, uint64_t iova,
                size_t length, uint32_t access, dirty::DirtyLog* dirty_log, CopyFn copy) {
  if (length == 0) return {};
  if (!make_range(iova, length)) return Error(EOVERFLOW, "iova + length wraps");

  HostSegments segments;
  bool simulated = false;
  uint64_t position = iova;
  uint64_t left = length;
  // A miss is resolved at most once per position (position only grows).
  std::optional<uint64_t> resolved_at;
  while (true) {
    if (!inside_aperture(config, position)) {
      return record_fault(faults, position, access, FaultReason::outside_aperture);
    }
    domain::Leaf leaf;
    if (!table.lookup_run(position, left, &leaf)) {
      if (resolver != nullptr && resolved_at != position && resolver->resolve(position)) {
        resolved_at = position;
        continue;
      }
      return record_fault(faults, position, access, FaultReason::not_present);
    }
    if ((leaf.prot & access) != access) {
      return record_fault(faults, position, access, FaultReason::permission);
    }
    const uint64_t chunk = std::min(left, leaf.remaining);
    // Keep checking past simulated memory: a real IOMMU would still fault
    // on a bad IOVA later in the range.
    if (leaf.host_access == mem::HostAccess::none) {
      simulated = true;
    } else if (!segments.append(leaf.address, chunk, leaf.host_access)) {
      return Error(ENOMEM, "cannot allocate the DMA segment list");
    }
    left -= chunk;
    if (left == 0) break;
    position += chunk;
  }
  if (simulated) return Error(ENXIO, "DMA to simulated memory: no memory behind the mapping");
  if (dirty_log != nullptr && !dirty_log->mark(iova, length)) {
    return Error(ENOMEM, "cannot allocate the dirty log");
  }

  size_t offset = 0;
  for (size_t i = 0; i < segments.size(); ++i) {
    const HostSegments::Segment& segment = segments[i];
    if (!copy(segment, offset)) {
      return record_fault(faults, iova + offset, access, FaultReason::host_memory);
    }
    offset += segment.bytes;
  }
  return {};
}

}  // namespace

const char* to_string(FaultReason reason) noexcept {
  switch (reason) {
    case FaultReason::not_present:
      return "not_present";
    case FaultReason::permission:
      return "permission";
    case FaultReason::outside_aperture:
      return "outside_aperture";
    case FaultReason::host_memory:
      return "host_memory";
  }
  return "unknown";
}

Result<std::shared_ptr<SoftDomain>> SoftDomain::create(const DomainConfig& config) {
  // Device DMA copies into file mappings rely on it.
  install_signal_handlers();
  if (config.aperture_start > config.aperture_last) {
    return Error(EINVAL, "aperture_start is above aperture_last");
  }
  if (config.min_page_size < kPageSize || !std::has_single_bit(config.min_page_size)) {
    return Error(EINVAL, "min_page_size must be a power of two of at least 4 KiB");
  }
  if ((config.page_sizes & kPageSize) == 0 || (config.page_sizes & ~kSupportedPageSizes) != 0) {
    return Error(EINVAL, "page_sizes must include 4 KiB and may add only 2 MiB and 1 GiB");
  }
  for (const IovaRange& range : config.reserved) {
    if (range.start > range.last) return Error(EINVAL, "reserved range with start above last");
  }

  Result<std::unique_ptr<domain::PageTable>> table =
      domain::PageTable::create(config.aperture_last, config.page_sizes);
  if (!table.ok()) return table.error();
  std::unique_ptr<IommuFault[]> ring;
  if (config.fault_log_capacity > 0) {
    ring.reset(IOMM_INJECT("domain.alloc") ? nullptr
                                           : new (std::nothrow)
                                                 IommuFault[config.fault_log_capacity]);
    if (ring == nullptr) return Error(ENOMEM, "cannot allocate the fault log");
  }
  try {
    auto impl = std::make_unique<Impl>(config, std::move(table).value(), std::move(ring));
    return std::shared_ptr<SoftDomain>(new SoftDomain(std::move(impl)));
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "cannot allocate the domain");
  }
}

SoftDomain::SoftDomain(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

SoftDomain::~SoftDomain() = default;

const DomainConfig& SoftDomain::config() const noexcept { return impl_->config; }

namespace domain {

namespace {

// A miss in an on-demand mapping asks the resolver to translate it again if
// its memory is back; the resolver runs inside a read-side section.
[[gnu::noinline]] bool resolve_miss(const std::atomic<MissResolver*>& resolver_slot,
                                    const PageTable& table, uint64_t iova, Leaf* leaf) {
  const auto resolve = [&] {
    MissResolver* resolver = resolver_slot.load(std::memory_order_acquire);
    return resolver != nullptr && resolver->resolve(iova) && table.lookup(iova, leaf);
  };
  if (sync::in_read_section()) return resolve();
  const RcuReadGuard guard;
  return resolve();
}

// translate_leaf, inlined into SoftDomain::translate too (a call less per
// lookup).
[[gnu::always_inline]] inline Result<Translation> translate_into(SoftDomain& domain, uint64_t iova,
                                                                 uint32_t access, Leaf* leaf) {
  auto& impl = Internals::impl(domain);
  if (!valid_access(access)) return Error(EINVAL, "access must be kProtRead and/or kProtWrite");
  if (!inside_aperture(impl.config, iova)) {
    return record_fault(impl.faults, iova, access, FaultReason::outside_aperture);
  }
  // The walk needs a read-side section (an unmap frees the tables it empties
  // after a grace period); the caller's, when it holds one, is enough. The
  // leaf is copied out; the memory behind it stays valid only under the
  // caller's guard. The walk is inline here and the miss path out of line
  // (a lambda holding both was compiled as a call per lookup).
  const PageTable& table = *impl.page_table;
  bool present = false;
  if (sync::in_read_section()) {
    present = table.lookup(iova, leaf);
  } else {
    const RcuReadGuard walk_guard;
    present = table.lookup(iova, leaf);
  }
  if (!present) present = resolve_miss(impl.resolver, table, iova, leaf);
  if (!present) return record_fault(impl.faults, iova, access, FaultReason::not_present);
  if ((leaf->prot & access) != access) {
    return record_fault(impl.faults, iova, access, FaultReason::permission);
  }
  return Translation{
      .iova = iova,
      .host = leaf->host_access == mem::HostAccess::none ? nullptr
                                                         : reinterpret_cast<void*>(leaf->address),
      .address = leaf->address,
      .prot = leaf->prot,
      .leaf_size = leaf->size,
      .contiguous = leaf->remaining,
  };
}

}  // namespace

Result<Translation> translate_leaf(SoftDomain& domain, uint64_t iova, uint32_t access, Leaf* leaf) {
  return translate_into(domain, iova, access, leaf);
}

}  // namespace domain

Result<Translation> SoftDomain::translate(uint64_t iova, uint32_t access) {
  domain::Leaf leaf;
  return domain::translate_into(*this, iova, access, &leaf);
}

BatchResult SoftDomain::translate_many(std::span<const uint64_t> iovas, uint32_t access,
                                       std::span<uint64_t> addresses) {
  if (Status checked = domain::check_batch(iovas, access, addresses); !checked.ok()) {
    return {.status = std::move(checked)};
  }
  const auto batch = [&] {
    return domain::translate_batch(*this, iovas, access, addresses.data(),
                                   [](size_t, uint64_t, unsigned) {});
  };
  if (sync::in_read_section()) return batch();
  const RcuReadGuard guard;
  return batch();
}

Status SoftDomain::dma_read(uint64_t iova, void* buf, size_t length) {
  auto* destination = static_cast<std::byte*>(buf);
  // Keeps the resolver's IOAS alive and the host pointers valid (transfer).
  const RcuReadGuard guard;
  return transfer(impl_->config, *impl_->page_table, impl_->faults,
                  impl_->resolver.load(std::memory_order_acquire), iova, length, kProtRead, nullptr,
                  [destination](const HostSegments::Segment& segment, size_t offset) {
                    return copy_from_host(segment, destination + offset);
                  });
}

Status SoftDomain::dma_write(uint64_t iova, const void* buf, size_t length) {
  const auto* source = static_cast<const std::byte*>(buf);
  // The guard spans the dirty mark and the copy, so a detach (which clears
  // dirty_log, then waits for readers) never leaves us a stale log.
  const RcuReadGuard guard;
  return transfer(impl_->config, *impl_->page_table, impl_->faults,
                  impl_->resolver.load(std::memory_order_acquire), iova, length, kProtWrite,
                  impl_->dirty_log.load(std::memory_order_acquire),
                  [source](const HostSegments::Segment& segment, size_t offset) {
                    return copy_to_host(segment, source + offset);
                  });
}

std::vector<IommuFault> SoftDomain::take_faults() { return impl_->faults.drain(); }

DomainCounters SoftDomain::counters() const {
  const domain::PageTableCounters table = impl_->page_table->counters();
  return DomainCounters{
      .mapped_bytes = table.mapped_bytes,
      .leaves_4k = table.leaves_4k,
      .leaves_2m = table.leaves_2m,
      .leaves_1g = table.leaves_1g,
      .table_pages = table.table_pages,
      .faults = impl_->faults.total(),
      .faults_dropped = impl_->faults.dropped(),
  };
}

}  // namespace iomm
