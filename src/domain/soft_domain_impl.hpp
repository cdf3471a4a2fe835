// State behind iomm::SoftDomain, shared with the IOAS code that attaches
// domains and fills their page tables.
#pragma once

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <utility>
#include <vector>

#include "dirty/dirty_log.hpp"
#include "domain/page_table.hpp"
#include "iomm/domain.hpp"
#include "sync/ranked_mutex.hpp"

namespace iomm::domain {

// Bounded log of IOMMU faults. When full, new faults are counted as dropped
// and the oldest ones are kept, like a hardware fault queue.
class FaultLog {
 public:
  // ring holds capacity entries (may be null when capacity is 0).
  FaultLog(std::unique_ptr<IommuFault[]> ring, size_t capacity) noexcept
      : ring_(std::move(ring)), capacity_(capacity) {}

  void record(const IommuFault& fault) noexcept;
  // Oldest first.
  std::vector<IommuFault> drain();

  [[nodiscard]] uint64_t total() const noexcept { return total_.load(std::memory_order_relaxed); }
  [[nodiscard]] uint64_t dropped() const noexcept {
    return dropped_.load(std::memory_order_relaxed);
  }

 private:
  sync::RankedMutex mutex_{sync::LockRank::fault_log, "FaultLog::mutex_"};
  std::unique_ptr<IommuFault[]> ring_;
  size_t capacity_;
  size_t head_ = 0;  // index of the oldest entry
  size_t size_ = 0;
  std::atomic<uint64_t> total_{0};
  std::atomic<uint64_t> dropped_{0};
};

// What a domain asks when a DMA or translate finds an IOVA not present: the
// IOAS it is attached to may install the translation (on-demand mappings,
// src/ioas/on_demand.hpp). Called inside the reader's RCU read section, so
// it must not block on a lock held across a grace period. True when a
// translation for iova may now be there (the reader looks again, once).
class MissResolver {
 public:
  virtual bool resolve(uint64_t iova) noexcept = 0;

 protected:
  ~MissResolver() = default;
};

}  // namespace iomm::domain

namespace iomm {

struct SoftDomain::Impl {
  Impl(DomainConfig domain_config, std::unique_ptr<domain::PageTable> table,
       std::unique_ptr<IommuFault[]> fault_ring) noexcept
      : config(std::move(domain_config)),
        page_table(std::move(table)),
        faults(std::move(fault_ring), config.fault_log_capacity) {}

  DomainConfig config;
  std::unique_ptr<domain::PageTable> page_table;
  domain::FaultLog faults;
  // The IOAS this domain is attached to (set and cleared by the IOAS).
  std::atomic<const void*> attached_to{nullptr};
  // The attached IOAS's dirty log: dma_write marks it (inside its RCU read
  // section); detach clears it before waiting for readers.
  std::atomic<dirty::DirtyLog*> dirty_log{nullptr};
  // The attached IOAS's miss resolver: set at attach, cleared at detach
  // before its grace period, like dirty_log.
  std::atomic<domain::MissResolver*> resolver{nullptr};
};

}  // namespace iomm

namespace iomm::domain {

// The IOAS fills and clears a domain's table through this; the public class
// keeps it private, so it stays out of the installed API.
struct Internals {
  static PageTable& page_table(SoftDomain& domain) noexcept { return *domain.impl_->page_table; }
  static SoftDomain::Impl& impl(SoftDomain& domain) noexcept { return *domain.impl_; }
};

// SoftDomain::translate, also giving the leaf it found (for the translation
// caches to fill from). leaf is set when the result is a translation.
Result<Translation> translate_leaf(SoftDomain& domain, uint64_t iova, uint32_t access, Leaf* leaf);

// kProtRead and/or kProtWrite, nothing else.
inline bool valid_access(uint32_t access) noexcept {
  return access != 0 && (access & ~uint32_t{kProtRead | kProtWrite}) == 0;
}

// The argument checks of both translate_many (SoftDomain's and
// TranslationCache's), before either translates anything: EINVAL for an
// access that is not kProtRead and/or kProtWrite, or fewer addresses than
// IOVAs.
inline Status check_batch(std::span<const uint64_t> iovas, uint32_t access,
                          std::span<const uint64_t> addresses) {
  if (!valid_access(access)) return Error(EINVAL, "access must be kProtRead and/or kProtWrite");
  if (addresses.size() < iovas.size()) {
    return Error(EINVAL, "fewer addresses than IOVAs to translate");
  }
  return {};
}

// SoftDomain::translate_many after its argument checks, inside the caller's
// RCU read-side section. The common case (a present leaf inside the aperture
// that allows the access) is decided here on the leaf entry; anything else
// is translate_leaf for that IOVA, so faults, on-demand mappings and errors
// are exactly translate()'s. on_leaf(i, entry, level) sees every IOVA the
// common case translated, after addresses[i] is set (the translation cache
// fills its samples from it).
template <typename OnLeaf>
BatchResult translate_batch(SoftDomain& domain, std::span<const uint64_t> iovas, uint32_t access,
                            uint64_t* addresses, OnLeaf&& on_leaf) {
  const auto& impl = Internals::impl(domain);
  // One compare for the aperture: below its start wraps to above its span.
  const uint64_t aperture_start = impl.config.aperture_start;
  const uint64_t aperture_span = impl.config.aperture_last - aperture_start;
  // kProtRead, kProtWrite -> pte::kReadable, pte::kWritable.
  const uint64_t need = pte::kPresent | (uint64_t{access} << 2);
  Status status;
  const size_t done = impl.page_table->lookup_many(
      iovas.data(), iovas.size(), [&](size_t i, uint64_t entry, unsigned level) {
        const uint64_t iova = iovas[i];
        if ((entry & need) == need && iova - aperture_start <= aperture_span) [[likely]] {
          const uint64_t size = uint64_t{1} << pte::level_shift(level);
          addresses[i] = (entry & pte::kAddressMask) + (iova & (size - 1));
          on_leaf(i, entry, level);
          return true;
        }
        Leaf leaf;
        Result<Translation> translation = translate_leaf(domain, iova, access, &leaf);
        if (!translation.ok()) {
          status = std::move(translation).error();
          return false;
        }
        addresses[i] = translation->address;
        return true;
      });
  return BatchResult{.translated = done, .status = std::move(status)};
}
inline PageTable& page_table_of(SoftDomain& domain) noexcept {
  return Internals::page_table(domain);
}

}  // namespace iomm::domain
