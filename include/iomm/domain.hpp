// Software IOMMU domains: a real radix I/O page table and a DMA interface
// for software devices.
//
// Contract
// - A domain is created detached and is filled by the IOAS it is attached to
//   (Ioas::attach). It can be attached to one IOAS at a time.
// - The page table is a radix tree of 512-entry tables. Leaves are 4 KiB,
//   2 MiB or 1 GiB (as allowed by page_sizes) wherever the IOVA and the host
//   address are both aligned and the mapping covers the whole leaf. Tables
//   an unmap empties are freed after its grace period, so the table count
//   follows what is mapped and an emptied slot takes a large leaf again.
// - Readers (translate, dma_read, dma_write) are lock-free: they run inside an
//   RCU read-side critical section (liburcu). The IOAS clears translations,
//   waits for a grace period, and only then unpins; a reader never copies
//   through a pointer into released memory.
// - A DMA is checked in full before any byte moves: an unmapped IOVA or a
//   permission mismatch anywhere in the range touches no memory, returns
//   EFAULT (unmapped) or EPERM (permission), and is recorded as an IOMMU fault
//   that the owner drains with take_faults().
// - A DMA to simulated memory returns ENXIO (there is no memory behind it);
//   this is not an IOMMU fault.
// - Memory that vanishes becomes an error, never a crash. A DMA into a file
//   that shrank under us, or into user memory (MemorySource::from_user) that
//   the caller unmapped or mprotected while it was mapped, returns EFAULT and
//   records a host_memory fault; bytes before the failing segment may have
//   moved. User memory is copied with process_vm_readv/writev (a system call
//   per contiguous host segment), file memory with a SIGBUS-guarded memcpy
//   (see iomm/signals.hpp).
// - Address reuse cannot be detected in user space: if the caller unmaps
//   user memory that is still mapped in an IOAS and something else is then
//   mapped at the same addresses, device DMA reads and writes that new
//   memory, as the pinned pages are no longer what the addresses name. Keep
//   user memory mapped until its IOAS mapping is gone, or use file-backed
//   memory (MemorySource::from_file), which the library maps itself.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "iomm/export.hpp"
#include "iomm/range.hpp"
#include "iomm/result.hpp"

namespace iomm {

namespace domain {
struct Internals;
}

enum Prot : uint32_t { kProtRead = 1U << 0, kProtWrite = 1U << 1 };

inline constexpr uint64_t kPageSize2M = 1ULL << 21;
inline constexpr uint64_t kPageSize1G = 1ULL << 30;

struct IOMM_API DomainConfig {
  uint64_t aperture_start = 0;
  uint64_t aperture_last = (1ULL << 48) - 1;
  // Smallest mapping granule; a power of two >= 4 KiB. Raises the IOAS's
  // IOVA alignment when attached.
  uint64_t min_page_size = kPageSize;
  // Leaf sizes the table may use: any of 4 KiB | 2 MiB | 1 GiB, must include 4 KiB.
  uint64_t page_sizes = kPageSize | kPageSize2M | kPageSize1G;
  // IOVA ranges the device cannot use (e.g. an MSI window).
  std::vector<IovaRange> reserved;
  size_t fault_log_capacity = 256;
};

struct IOMM_API Translation {
  uint64_t iova = 0;  // the translated IOVA
  // Host address of that byte; nullptr for simulated memory. For user memory
  // it is the caller's address, valid only while the caller keeps it mapped:
  // dma_read/dma_write copy through it safely, a raw dereference does not.
  void* host = nullptr;
  uint64_t address = 0;     // host address, or synthetic address for simulated memory
  uint32_t prot = 0;        // kProtRead | kProtWrite
  uint64_t leaf_size = 0;   // 4 KiB, 2 MiB or 1 GiB
  uint64_t contiguous = 0;  // bytes from iova to the end of the leaf
};

// The outcome of a batch translation (translate_many): how many IOVAs, from
// the first, were translated (all of them on success); on failure, status is
// the error of iovas[translated], the first one that failed, exactly as
// translate() would give it for that IOVA alone.
struct IOMM_API BatchResult {
  size_t translated = 0;
  Status status;
  [[nodiscard]] bool ok() const noexcept { return status.ok(); }
};

enum class FaultReason {
  not_present,
  permission,
  outside_aperture,
  // The translation is valid but the host memory behind it is gone: user
  // memory the caller unmapped or protected, or a file that shrank.
  host_memory,
};

IOMM_API const char* to_string(FaultReason reason) noexcept;

struct IOMM_API IommuFault {
  uint64_t iova = 0;
  uint32_t requested = 0;  // kProtRead or kProtWrite
  FaultReason reason = FaultReason::not_present;
};

struct IOMM_API DomainCounters {
  uint64_t mapped_bytes = 0;
  uint64_t leaves_4k = 0;
  uint64_t leaves_2m = 0;
  uint64_t leaves_1g = 0;
  uint64_t table_pages = 0;
  uint64_t faults = 0;          // total ever recorded
  uint64_t faults_dropped = 0;  // recorded while the log was full
};

class Ioas;

class IOMM_API SoftDomain {
 public:
  // EINVAL: aperture_start > aperture_last, min_page_size not a power of two
  // >= 4 KiB, page_sizes without 4 KiB or with other sizes, a reserved range
  // with start > last.
  static Result<std::shared_ptr<SoftDomain>> create(const DomainConfig& config);
  ~SoftDomain();
  SoftDomain(const SoftDomain&) = delete;
  SoftDomain& operator=(const SoftDomain&) = delete;

  [[nodiscard]] const DomainConfig& config() const noexcept;

  // Translate one IOVA for the given access (kProtRead or kProtWrite) by
  // walking the table (iomm::TranslationCache puts an IOTLB in front of
  // it). A translation removed by an unmap that returned before this call
  // began is never returned. Lock-free (not wait-free: a fault is recorded under the fault log's
  // lock). The walk runs inside an RCU read-side section, because unmaps
  // free the page-table pages they empty after a grace period: the caller's
  // guard if it holds one (then the walk costs no RCU call), else its own,
  // so it is safe without a guard. The returned host pointer is only guaranteed valid
  // while the caller holds an iomm::RcuReadGuard (see rcu.hpp) taken before
  // the call.
  // Errors: EFAULT not mapped, EPERM wrong permission (both recorded as faults).
  Result<Translation> translate(uint64_t iova, uint32_t access);

  // Translate a batch of IOVAs for one access, as a DMA engine translates a
  // scatter list: addresses[i] = translate(iovas[i], access)->address, in
  // order, stopping at the first IOVA that fails (its fault is recorded,
  // none after it is looked up). Each translation has translate()'s
  // guarantee relative to the start of the call. The walks are
  // software-pipelined (independent lookups overlap their cache misses), so
  // a batch costs less than a loop of translate(). Errors: EINVAL (nothing
  // translated) when access is invalid or addresses is shorter than iovas;
  // per IOVA, translate()'s errors (see BatchResult).
  BatchResult translate_many(std::span<const uint64_t> iovas, uint32_t access,
                             std::span<uint64_t> addresses);

  // Device DMA: copy between the IOVA range and buf. All-or-nothing checks.
  Status dma_read(uint64_t iova, void* buf, size_t length);
  Status dma_write(uint64_t iova, const void* buf, size_t length);

  // Drain recorded faults, oldest first.
  std::vector<IommuFault> take_faults();
  [[nodiscard]] DomainCounters counters() const;

 private:
  friend class Ioas;
  friend struct domain::Internals;  // src/domain/soft_domain_impl.hpp
  struct Impl;
  explicit SoftDomain(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace iomm
