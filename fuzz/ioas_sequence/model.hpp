// The shadow model of the IOAS sequence fuzzer: the process-wide fixtures
// (memfds, simulated sources, user memory), and one model object per IOAS,
// domain and access of an input, which the operations update and the oracle
// compares with the library after every step.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <vector>

#include "fuzz_common.hpp"
#include "iomm/access.hpp"
#include "iomm/accounting.hpp"
#include "iomm/domain.hpp"
#include "iomm/ioas.hpp"
#include "iomm/source.hpp"
#include "mem/mem_object.hpp"  // dma_address() of a source's backing, for translate checks

namespace iomm::fuzz::ioas_sequence {

constexpr uint64_t kKiB = 1024;

constexpr uint64_t kMiB = 1024 * kKiB;

constexpr uint64_t kGiB = 1024 * kMiB;

constexpr uint64_t kMax = UINT64_MAX;

constexpr size_t kMaxSteps = 96;

constexpr uint64_t kRwMax = 256 * kKiB;  // longest read/write/DMA buffer

// Process-wide memory (created once, reused by every input).

struct Fixtures {
  int file_rw_fd = -1;  // memfd, read-write
  uint64_t file_rw_size = 1 * kMiB;
  int file_ro_fd = -1;  // a second memfd, opened read-only
  uint64_t file_ro_size = 64 * kKiB;
  std::optional<MemorySource> file_rw_whole, file_ro_whole;  // keep the file objects mapped
  std::optional<MemorySource> sim[2];
  uint64_t sim_size = 1 * kGiB;
  // User memory: [read-write | read-only | PROT_NONE], contiguous.
  uint8_t* user = nullptr;
  uint64_t user_rw = 256 * kKiB, user_ro = 16 * kKiB, user_none = 16 * kKiB;
  [[nodiscard]] uint64_t user_total() const { return user_rw + user_ro + user_none; }
  bool charged = true;  // CAP_IPC_LOCK dropped: mappings are charged
  uint64_t rlimit = 0;  // RLIMIT_MEMLOCK
};

inline Fixtures* fx = nullptr;

void setup_fixtures();

// Shadow model.

enum OwnerKey { kNoOwner = -1, kProcessOwner = 0, kUserOwner = 1 };

struct AreaModel {
  uint64_t iova;
  uint64_t len;
  uint32_t prot;
  MemorySource src;
  int owner;
  bool host_invalid = false;  // Ioas::invalidate_host until replace_host
  [[nodiscard]] uint64_t last() const { return iova + len - 1; }
  [[nodiscard]] IovaRange range() const { return {iova, last()}; }
};

using AreaMap = std::map<uint64_t, AreaModel>;

// The areas of `areas` overlapping r, in IOVA order.
inline std::vector<const AreaModel*> overlapping(const AreaMap& areas, const IovaRange& r) {
  std::vector<const AreaModel*> out;
  for (const auto& [start, a] : areas) {
    if (a.range().overlaps(r)) out.push_back(&a);
  }
  return out;
}

// The area of `areas` containing iova, if any.
inline const AreaModel* area_at(const AreaMap& areas, uint64_t iova) {
  auto it = areas.upper_bound(iova);
  if (it == areas.begin()) return nullptr;
  --it;
  return it->second.last() >= iova ? &it->second : nullptr;
}

inline uint64_t dma_address(const MemorySource& s, uint64_t skip = 0) {
  return s.object()->dma_address(s.offset() + skip);
}

struct DomainModel;

struct IoasModel {
  std::shared_ptr<Ioas> ioas;
  AccountMode mode = AccountMode::per_process;
  uint32_t max_mappings = kDefaultMaxMappings;
  AreaMap areas;
  std::vector<std::shared_ptr<DomainModel>> domains;
  std::vector<IovaRange> user_reserved;
  std::vector<IovaRange> allowed;  // sorted
  uint64_t accesses = 0;
  // The dirty log: whether tracking is on, and the 4 KiB IOVA pages written
  // (access writes that reached the copy, successful domain DMA writes)
  // since tracking was switched or the pages were last read and cleared.
  bool dirty_tracking = false;
  std::set<uint64_t> dirty_pages;

  ~IoasModel();
  // Records a write of [iova, iova + len) in the dirty log (len > 0, no wrap).
  void mark_dirty(uint64_t iova, uint64_t len) {
    if (!dirty_tracking) return;
    for (uint64_t p = iova >> kPageShift; p <= (iova + len - 1) >> kPageShift; ++p) {
      dirty_pages.insert(p);
    }
  }
  [[nodiscard]] int owner() const {
    if (!fx->charged) return kNoOwner;
    switch (mode) {
      case AccountMode::none:
        return kNoOwner;
      case AccountMode::per_process:
        return kProcessOwner;
      case AccountMode::per_user:
        return kUserOwner;
    }
    return kNoOwner;
  }
  [[nodiscard]] uint64_t alignment() const;
  [[nodiscard]] std::vector<IovaRange> reserved() const;
  // The areas overlapping r, in IOVA order.
  [[nodiscard]] std::vector<const AreaModel*> overlapping(const IovaRange& r) const {
    return ioas_sequence::overlapping(areas, r);
  }
  [[nodiscard]] const AreaModel* find(uint64_t iova) const { return area_at(areas, iova); }
};

struct DomainModel {
  std::shared_ptr<SoftDomain> domain;
  DomainConfig cfg;
  IoasModel* attached = nullptr;
  uint64_t expected_faults = 0;

  [[nodiscard]] std::vector<IovaRange> reservations() const {
    std::vector<IovaRange> out = cfg.reserved;
    if (cfg.aperture_start > 0) out.push_back({0, cfg.aperture_start - 1});
    if (cfg.aperture_last < kMax) out.push_back({cfg.aperture_last + 1, kMax});
    return out;
  }
  [[nodiscard]] bool in_aperture(uint64_t iova) const {
    return iova >= cfg.aperture_start && iova <= cfg.aperture_last;
  }
};

struct AccessModel;

inline IovaRange page_range(uint64_t page_iova) { return {page_iova, page_iova + kPageSize - 1}; }

// Whether the threads of a concurrent round are running, and which round.
inline std::atomic<bool> g_round_running{false};
inline std::atomic<uint64_t> g_round_id{0};

// The range of the unmap this thread has in progress: callbacks run on the
// unmapping thread (access.hpp), so each thread of a concurrent round has its own.
inline thread_local std::optional<IovaRange> g_unmap_request;

struct AccessModel {
  std::shared_ptr<IoasModel> io;  // declared first: destroyed after the access
  std::mutex mu;
  std::vector<std::pair<uint64_t, uint64_t>> pins;  // iova, length; guarded by mu
  std::map<uint64_t, uint32_t> page_pins;           // page iova -> pin_pages count; guarded by mu
  bool refuse_alternate = false;                    // ignore every other notification (retry path)
  bool probe_in_callback = false;                   // try pin/read of the range being unmapped
  uint64_t notifications = 0;
  // Ranges this access tried to pin in round tried_round (guarded by mu,
  // which a pin holds until it has recorded or failed): a pin in flight
  // there, even one that then failed, may get it called.
  std::vector<IovaRange> tried;
  uint64_t tried_round = 0;
  std::shared_ptr<Access> access;

  // Under mu, before a pin in a concurrent round.
  void note_try(const IovaRange& r) {
    if (tried_round != g_round_id.load()) {
      tried.clear();
      tried_round = g_round_id.load();
    }
    tried.push_back(r);
  }

  ~AccessModel() {
    access.reset();  // unpins what it still holds
    if (io) --io->accesses;
  }

  void on_unmap(const IovaRange& r) {
    std::lock_guard lk(mu);
    FUZZ_CHECK(access != nullptr, "unmap callback before create returned");
    FUZZ_CHECK(g_unmap_request.has_value() && g_unmap_request->contains(r),
               "callback range [%#lx, %#lx] is not inside the unmap in progress", r.start, r.last);
    const bool overlaps =
        std::any_of(pins.begin(), pins.end(),
                    [&](const auto& p) {
                      return IovaRange{p.first, p.first + p.second - 1}.overlaps(r);
                    }) ||
        std::any_of(page_pins.begin(), page_pins.end(),
                    [&](const auto& p) { return page_range(p.first).overlaps(r); });
    // Only accesses whose pins, held or in flight, overlap the range are
    // called. A pin in flight during a round may fail after the callback was
    // chosen, so a pin tried there this round counts too.
    const bool tried_here =
        g_round_running.load() && tried_round == g_round_id.load() &&
        std::any_of(tried.begin(), tried.end(), [&](const IovaRange& t) { return t.overlaps(r); });
    FUZZ_CHECK(overlaps || tried_here, "callback for [%#lx, %#lx] on an access with no pin there",
               r.start, r.last);
    if (!overlaps) return;
    if (refuse_alternate && (notifications++ % 2) == 0) return;
    if (probe_in_callback) {
      // New pins and rw of a range being unmapped fail with EINVAL.
      auto pin = access->pin(r.start & ~(kPageSize - 1), kPageSize, kProtRead);
      FUZZ_CHECK(pin.code() == EINVAL, "pin inside the unmapping range gave %s",
                 errno_name(pin.code()));
      uint8_t byte = 0;
      auto rd = access->read(r.start, &byte, 1);
      FUZZ_CHECK(rd.code() == EINVAL, "read inside the unmapping range gave %s",
                 errno_name(rd.code()));
    }
    std::erase_if(pins, [&](const auto& p) {
      if (!IovaRange{p.first, p.first + p.second - 1}.overlaps(r)) return false;
      Status s = access->unpin(p.first, p.second);
      FUZZ_CHECK(s.ok(), "unpin of a held pin failed in the callback: %s",
                 s.error().describe().c_str());
      return true;
    });
    // Page pins are unpinned one page at a time, as often as they were pinned.
    std::erase_if(page_pins, [&](const auto& p) {
      if (!page_range(p.first).overlaps(r)) return false;
      for (uint32_t i = 0; i < p.second; ++i) {
        Status s = access->unpin_pages(p.first, 1);
        FUZZ_CHECK(s.ok(), "unpin_pages of a held page failed in the callback: %s",
                   s.error().describe().c_str());
      }
      return true;
    });
  }
};

// The world of one input.
struct World {
  std::shared_ptr<IoasModel> ioas[2];
  std::shared_ptr<DomainModel> domain[2];
  std::unique_ptr<AccessModel> access[2];
  std::optional<uint64_t> limit[2];  // configured limits: per_process, per_user
  uint64_t last_charge[2] = {0, 0};
  uint64_t probe_iova = 0;

  std::vector<IoasModel*> live_ioas() const {
    std::vector<IoasModel*> out;
    for (const auto& m : ioas) {
      if (m) out.push_back(m.get());
    }
    for (const auto& a : access) {
      if (a && std::find(out.begin(), out.end(), a->io.get()) == out.end()) {
        out.push_back(a->io.get());
      }
    }
    return out;
  }
  std::vector<DomainModel*> live_domains() const {
    std::vector<DomainModel*> out;
    for (const auto& d : domain) {
      if (d) out.push_back(d.get());
    }
    for (IoasModel* m : live_ioas()) {
      for (const auto& d : m->domains) {
        if (std::find(out.begin(), out.end(), d.get()) == out.end()) out.push_back(d.get());
      }
    }
    return out;
  }
  std::vector<AccessModel*> accesses_of(const IoasModel* m) const {
    std::vector<AccessModel*> out;
    for (const auto& a : access) {
      if (a && a->io.get() == m) out.push_back(a.get());
    }
    return out;
  }
};

inline World* w = nullptr;

}  // namespace iomm::fuzz::ioas_sequence
