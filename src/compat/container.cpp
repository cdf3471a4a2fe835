// Type1 container operations in type1's check order
// (reference: kernel-semantics.md §1.2, §1.4, §1.6, §1.8).
#include "compat/container.hpp"

#include <linux/vfio.h>

#include <algorithm>
#include <bit>
#include <new>
#include <shared_mutex>
#include <thread>
#include <utility>

#include "core/check.hpp"
#include "fault/inject.hpp"

namespace iomm::compat {

namespace {

constexpr uint64_t kPageMask = ~(kPageSize - 1);

// Type1's error for a failed domain attach: the IOAS says EADDRINUSE for a
// mapping that does not fit, type1 says EINVAL.
Error type1_attach_error(const Error& e) {
  if (e.code() == EADDRINUSE) return Error(EINVAL, e.message());
  return e;
}

// OR 4 KiB-page bits into bits of 2^shift-byte pages.
void fold(std::span<const uint64_t> in, uint64_t npages4k, unsigned shift,
          std::span<uint64_t> out) {
  const unsigned k = shift - kPageShift;
  std::fill(out.begin(), out.end(), 0);
  for (uint64_t p = 0; p < npages4k; ++p) {
    if ((in[p >> 6] >> (p & 63) & 1) == 0) continue;
    const uint64_t j = p >> k;
    if ((j >> 6) < out.size()) out[j >> 6] |= uint64_t{1} << (j & 63);
  }
}

}  // namespace

void UnmapNotifier::notify(uint64_t iova, uint64_t size) {
  std::shared_lock lk(mu_);
  if (live_) fn_(opaque_, iova, size);
}

void UnmapNotifier::stop() noexcept {
  std::unique_lock lk(mu_);
  live_ = false;
}

Container::~Container() { close(); }

void Container::enter() noexcept {
  std::lock_guard lk(calls_mu_);
  ++calls_;
}

void Container::leave() noexcept {
  std::lock_guard lk(calls_mu_);
  if (--calls_ == 0) calls_done_.notify_all();
}

void Container::close() noexcept {
  // One group at a time, so that nothing allocates and each access is
  // released with mu dropped (releasing it waits for its running callback,
  // which may call back into this container).
  for (bool more = true; more;) {
    std::shared_ptr<Access> access;
    std::lock_guard lk(mu);
    if (groups.empty()) {
      more = false;
      continue;
    }
    iomm_vfio_group* g = groups.back();
    if (iommu_set) access = detach_group(g);
    {
      std::lock_guard link(g->link_mu);
      g->container = nullptr;
    }
    groups.pop_back();
  }
  std::shared_ptr<Ioas> old;
  {
    std::lock_guard lk(mu);
    old = take_iommu();
  }
  std::unique_lock lk(calls_mu_);
  calls_done_.wait(lk, [&] { return calls_ == 0; });
}

bool Container::has_mediated() const {
  return std::any_of(groups.begin(), groups.end(), [](auto* g) { return g->mediated; });
}

bool Container::has_domain() const {
  return std::any_of(groups.begin(), groups.end(),
                     [](auto* g) { return !g->mediated && g->attached; });
}

uint64_t Container::pgsize_bitmap() const {
  uint64_t bitmap = UINT64_MAX;
  for (const auto* g : groups) {
    if (!g->mediated && g->attached) bitmap &= g->pgsize_bitmap;
  }
  if ((bitmap & ~kPageMask) != 0) {
    bitmap &= kPageMask;
    bitmap |= kPageSize;
  }
  return bitmap;
}

Result<long> Container::check_extension(unsigned long ext) {
  std::lock_guard lk(mu);
  switch (ext) {
    case VFIO_TYPE1_IOMMU:
    case VFIO_TYPE1v2_IOMMU:
    case VFIO_UNMAP_ALL:
      return 1L;
    case VFIO_UPDATE_VADDR:
      // Asked of the driver with no container data before SET_IOMMU.
      return (iommu_set && !has_mediated()) ? 1L : 0L;
    default:
      return 0L;
  }
}

Status Container::attach_group(iomm_vfio_group* g) {
  if (g->mediated) {
    auto access = Access::create(
        ioas, [n = g->notifier](const IovaRange& r) { n->notify(r.start, r.last - r.start + 1); });
    if (!access.ok()) return access.error();
    std::lock_guard link(g->link_mu);
    g->access = std::move(access).value();
    return {};
  }
  if (Status s = ioas->attach(g->domain); !s) return type1_attach_error(s.error());
  g->attached = true;
  return {};
}

std::shared_ptr<Access> Container::detach_group(iomm_vfio_group* g) noexcept {
  if (g->mediated) {
    std::lock_guard link(g->link_mu);
    return std::exchange(g->access, nullptr);
  }
  if (g->attached) {
    (void)ioas->detach(g->domain);
    g->attached = false;
  }
  return nullptr;
}

std::shared_ptr<Ioas> Container::take_iommu() noexcept {
  if (!iommu_set) return nullptr;
  dmas.clear();
  iommu_set = false;
  v2.store(false);
  vaddr_invalid.store(0);
  dirty_tracking = false;
  return std::exchange(ioas, nullptr);
}

Dma& Container::record(uint64_t iova) {
  auto it = dmas.find(iova);
  IOMM_CHECK(it != dmas.end(), "a marked or chosen mapping record vanished under mu");
  return it->second;
}

Result<bool> Container::wait_for_unmap(std::unique_lock<sync::RankedMutex>& lk, uint64_t first,
                                       uint64_t last) {
  std::thread::id holder{};
  auto it = dmas.upper_bound(first);
  if (it != dmas.begin()) --it;
  for (; it != dmas.end() && it->second.iova <= last; ++it) {
    const Dma& d = it->second;
    if (d.iova + d.size - 1 >= first && d.unmapping()) {
      holder = d.unmapper;
      break;
    }
  }
  if (holder == std::thread::id{}) return false;
  // Follow who waits for whom: a chain that comes back to us never ends.
  // Chains cannot loop otherwise, as no wait that closes one is entered.
  const auto self = std::this_thread::get_id();
  for (std::thread::id t = holder;;) {
    if (t == self) {
      return Error(EDEADLOCK,
                   "a dma_unmap callback reaches a mapping its own unmap is removing, directly "
                   "or through other unmaps waiting for each other");
    }
    const UnmapWaiter* w = waiters_;
    while (w != nullptr && w->self != t) w = w->next;
    if (w == nullptr) break;
    t = w->holder;
  }
  UnmapWaiter me{self, holder, waiters_};
  waiters_ = &me;
  unmap_done_.wait(lk);
  UnmapWaiter** link = &waiters_;
  while (*link != &me) link = &(*link)->next;
  *link = me.next;
  return true;
}

Status Container::set_iommu(unsigned long type) {
  std::lock_guard lk(mu);
  if (groups.empty() || iommu_set) {
    return Error(EINVAL, "SET_IOMMU needs a group and an unset container");
  }
  bool is_v2 = false;
  switch (type) {
    case VFIO_TYPE1_IOMMU:
      break;
    case VFIO_TYPE1v2_IOMMU:
    case VFIO_TYPE1_NESTING_IOMMU:
      is_v2 = true;
      break;
    default:
      return Error(ENODEV, "no IOMMU driver of this type");
  }
  auto created = Ioas::create({.account_mode = AccountMode::per_process, .max_mappings = limit});
  if (!created.ok()) return created.error();
  ioas = std::move(created).value();
  size_t done = 0;
  Status result;
  for (; done < groups.size(); ++done) {
    if (result = attach_group(groups[done]); !result) break;
  }
  if (!result) {
    // The new IOAS has no mapping, so no callback can run: the accesses can
    // go with mu held.
    for (size_t i = 0; i < done; ++i) (void)detach_group(groups[i]);
    ioas.reset();
    return result;
  }
  iommu_set = true;
  v2.store(is_v2);
  return {};
}

Status Container::add_group(iomm_vfio_group* g) {
  std::lock_guard lk(mu);
  try {
    if (IOMM_INJECT("vfio.alloc_group_slot")) throw std::bad_alloc();
    groups.reserve(groups.size() + 1);
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory");
  }
  if (iommu_set) {
    if (vaddr_invalid.load() != 0) return Error(EBUSY, "a vaddr is invalid");
    if (Status s = attach_group(g); !s) return s;
  }
  groups.push_back(g);
  return {};
}

Container::Released Container::remove_group(iomm_vfio_group* g) noexcept {
  std::lock_guard lk(mu);
  Released out;
  auto it = std::find(groups.begin(), groups.end(), g);
  if (it == groups.end()) return out;  // the container was closed first
  if (iommu_set) out.access = detach_group(g);
  groups.erase(it);
  if (groups.empty()) out.ioas = take_iommu();
  return out;
}

Status Container::map(uint64_t iova, uint64_t size, uint64_t vaddr, bool set_vaddr, uint32_t prot) {
  if ((prot != 0 && set_vaddr) || (prot == 0 && !set_vaddr)) {
    return Error(EINVAL, "MAP_DMA needs READ/WRITE, or VADDR alone");
  }
  std::unique_lock lk(mu);
  for (;;) {
    // Checked under this hold of mu: the last group may have gone since the
    // ioctl layer looked.
    if (!iommu_set) return Error(EINVAL, "no IOMMU set");
    const uint64_t pgsize = min_pgsize();
    if (size == 0 || ((size | iova | vaddr) & (pgsize - 1)) != 0) {
      return Error(EINVAL, "size, iova and vaddr must be multiples of the minimum page size");
    }
    if (iova + size - 1 < iova || vaddr + size - 1 < vaddr) return Error(EINVAL, "range wraps");
    // A mapping being unmapped still exists (EEXIST below), as in type1; a
    // VADDR update of it waits for the unmap and then finds it gone.
    if (!set_vaddr) break;
    auto waited = wait_for_unmap(lk, iova, iova + size - 1);
    if (!waited.ok()) return waited.error();
    if (!*waited) break;
  }
  const uint64_t last = iova + size - 1;
  auto overlap = dmas.end();
  {
    auto it = dmas.upper_bound(last);
    if (it != dmas.begin()) {
      --it;
      if (it->second.iova + it->second.size - 1 >= iova) overlap = it;
    }
  }
  if (set_vaddr) {
    if (overlap == dmas.end()) return Error(ENOENT, "no mapping at this IOVA");
    Dma& d = overlap->second;
    if (!d.vaddr_invalid || d.iova != iova || d.size != size) {
      return Error(EINVAL, "VADDR needs an invalidated mapping with the same iova and size");
    }
    Backing b;
    auto source = resolve_vaddr(fds, vaddr, size, &b);
    if (!source.ok()) return source.error();
    if (d.backing.file && (!b.file || b.dev != d.backing.dev || b.ino != d.backing.ino ||
                           b.offset != d.backing.offset)) {
      return Error(EINVAL, "the new vaddr does not reach the same memory object");
    }
    if (!d.backing.file && b.file) {
      return Error(EINVAL, "the new vaddr does not reach the same memory object");
    }
    if (Status s = ioas->replace_host(iova, *source, OwnerSpec{.pid = owner_pid}); !s) return s;
    d.vaddr = vaddr;
    d.backing = b;
    d.vaddr_invalid = false;
    vaddr_invalid.fetch_sub(1);
    return {};
  }
  if (overlap != dmas.end()) return Error(EEXIST, "range overlaps a mapping");
  if (dmas.size() >= limit) return Error(ENOSPC, "dma_entry_limit reached");
  if (has_domain()) {
    const auto ranges = ioas->iova_ranges();
    const bool fits = std::any_of(ranges.begin(), ranges.end(), [&](const IovaRange& r) {
      return r.start <= iova && last <= r.last;
    });
    if (!fits) return Error(EINVAL, "range is not inside one valid IOVA range");
  }
  Backing b;
  auto source = resolve_vaddr(fds, vaddr, size, &b);
  if (!source.ok()) return source.error();
  auto mapped = ioas->map_as(*source, prot, iova, OwnerSpec{.pid = owner_pid});
  if (!mapped.ok()) {
    if (mapped.code() == EPERM) return Error(EFAULT, "write access to read-only memory");
    return mapped.error();
  }
  try {
    if (IOMM_INJECT("vfio.alloc_dma")) throw std::bad_alloc();
    dmas.emplace(iova, Dma{iova, size, vaddr, prot, false, b});
  } catch (const std::bad_alloc&) {
    (void)ioas->unmap(iova, size);
    return Error(ENOMEM, "out of memory");
  }
  return {};
}

Status Container::unmap(uint64_t iova, uint64_t size, bool all, bool vaddr, uint64_t* unmapped,
                        uint64_t bitmap_pgsize, std::span<uint64_t> bitmap_out) {
  const bool want_bitmap = bitmap_pgsize != 0;
  std::unique_lock lk(mu);
  uint64_t pgsize = 0;
  uint64_t last = 0;
  // Type1 restarts its walk after notifying drivers; here an unmap that
  // touches mappings another unmap is removing waits for it and starts over.
  for (;;) {
    if (!iommu_set) return Error(EINVAL, "no IOMMU set");
    if (vaddr && has_mediated()) return Error(EBUSY, "VADDR with a mediated group present");
    pgsize = min_pgsize();
    if ((iova & (pgsize - 1)) != 0) return Error(EINVAL, "iova not aligned to the page size");
    if (all) {
      if (iova != 0 || size != 0) return Error(EINVAL, "ALL needs iova and size 0");
      last = UINT64_MAX;
    } else {
      if (size == 0 || (size & (pgsize - 1)) != 0 || iova + size - 1 < iova) {
        return Error(EINVAL, "bad size");
      }
      last = iova + size - 1;
    }
    if (want_bitmap && (!dirty_tracking || bitmap_pgsize != pgsize)) {
      return Error(EINVAL, "dirty bitmap needs tracking on and the minimum page size");
    }
    auto waited = wait_for_unmap(lk, iova, last);
    if (!waited.ok()) return waited.error();
    if (!*waited) break;
  }
  auto containing = [&](uint64_t a) -> const Dma* {
    auto it = dmas.upper_bound(a);
    if (it == dmas.begin()) return nullptr;
    --it;
    return it->second.iova + it->second.size - 1 >= a ? &it->second : nullptr;
  };
  const bool is_v2 = v2.load();
  if (is_v2 && !all) {
    if (const Dma* d = containing(iova); d && d->iova != iova) {
      return Error(EINVAL, "unmap would bisect a mapping");
    }
    if (const Dma* d = containing(last); d && d->iova + d->size - 1 != last) {
      return Error(EINVAL, "unmap would bisect a mapping");
    }
  }
  // The mappings this call removes: those starting in [iova, last]; for v1
  // nothing if the first one overlapping starts below iova.
  struct Victim {
    uint64_t iova;
    uint64_t size;
  };
  std::vector<Victim> victims;  // copies: take_iommu drops the records
  std::vector<uint64_t> raw;    // 4 KiB-page dirty bits of [iova, last]
  const uint64_t npages4k = want_bitmap ? size >> kPageShift : 0;
  {
    auto it = dmas.upper_bound(iova);
    if (it != dmas.begin()) {
      auto prev = std::prev(it);
      if (prev->second.iova + prev->second.size - 1 >= iova) it = prev;
    }
    if (it != dmas.end() && it->second.iova < iova && !is_v2) {
      *unmapped = 0;
      return {};  // v1: start inside a mapping unmaps nothing
    }
    if (it != dmas.end() && it->second.iova < iova) ++it;  // v2 all: cannot happen
    try {
      if (IOMM_INJECT("vfio.alloc_unmap")) throw std::bad_alloc();
      for (; it != dmas.end() && it->second.iova <= last; ++it)
        victims.push_back({it->first, it->second.size});
      if (want_bitmap) {
        if (IOMM_INJECT("vfio.alloc_bitmap")) throw std::bad_alloc();
        raw.assign((npages4k + 63) / 64, 0);
      }
    } catch (const std::bad_alloc&) {
      return Error(ENOMEM, "out of memory");
    }
  }
  if (vaddr) {
    if (victims.empty()) {
      *unmapped = 0;
      return {};
    }
    for (const Victim& v : victims) {
      const Dma& d = record(v.iova);
      if (d.vaddr_invalid) return Error(EINVAL, "a vaddr is already invalid");
      if (Status s = check_vaddr_invalidation(d.backing); !s) return s;
    }
    const Victim& lo = victims.front();
    const Victim& hi = victims.back();
    auto bytes = ioas->invalidate_host(lo.iova, hi.iova + hi.size - lo.iova);
    if (!bytes.ok()) return bytes.error();
    for (const Victim& v : victims) record(v.iova).vaddr_invalid = true;
    vaddr_invalid.fetch_add(static_cast<uint32_t>(victims.size()));
    *unmapped = *bytes;
    return {};
  }
  // Drop mu while the IOAS removes the victims: it calls the drivers'
  // dma_unmap callbacks, which may call back into this container. One IOAS
  // unmap per mapping, as type1 notifies per vfio_dma: a MAP into a hole
  // between victims while mu is dropped is left alone.
  const auto self = std::this_thread::get_id();
  for (const Victim& v : victims) record(v.iova).unmapper = self;
  const std::shared_ptr<Ioas> io = ioas;
  lk.unlock();
  uint64_t bytes = 0;
  size_t done = 0;
  Status result;
  for (; done < victims.size(); ++done) {
    const Victim& v = victims[done];
    auto removed = want_bitmap ? io->unmap_collecting_dirty(v.iova, v.size, iova, raw)
                               : io->unmap_range_allow_empty(v.iova, v.size);
    if (!removed.ok()) {
      result = removed.error();
      break;
    }
    bytes += *removed;
  }
  lk.lock();
  // If the IOMMU was released meanwhile, the records are gone already.
  if (ioas == io) {
    for (size_t i = 0; i < victims.size(); ++i) {
      Dma& v = record(victims[i].iova);
      if (i >= done) {
        v.unmapper = {};
        continue;
      }
      if (v.vaddr_invalid) vaddr_invalid.fetch_sub(1);
      dmas.erase(victims[i].iova);
    }
  }
  unmap_done_.notify_all();
  if (!result) return result;
  if (want_bitmap) fold(raw, npages4k, std::countr_zero(pgsize), bitmap_out);
  *unmapped = bytes;
  return {};
}

Status Container::dirty_get(uint64_t iova, uint64_t size, uint64_t pgsize,
                            std::span<uint64_t> out) {
  std::unique_lock lk(mu);
  for (;;) {
    if (!iommu_set) return Error(EINVAL, "no IOMMU set");
    const uint64_t iommu_pgsize = min_pgsize();
    if (pgsize != iommu_pgsize) {
      return Error(EINVAL, "bitmap pgsize must be the minimum page size");
    }
    if ((iova & (iommu_pgsize - 1)) != 0) return Error(EINVAL, "iova not aligned");
    if (size == 0 || (size & (iommu_pgsize - 1)) != 0) return Error(EINVAL, "bad size");
    if (!dirty_tracking) return Error(EINVAL, "dirty tracking is off");
    // A mapping being unmapped reports its bits through that unmap.
    auto waited = wait_for_unmap(lk, iova, iova + size - 1);
    if (!waited.ok()) return waited.error();
    if (!*waited) break;
  }
  const uint64_t last = iova + size - 1;
  for (const auto& [start, d] : dmas) {
    const uint64_t dl = d.iova + d.size - 1;
    if (d.iova < iova && dl >= iova) return Error(EINVAL, "range bisects a mapping");
    if (d.iova <= last && dl > last) return Error(EINVAL, "range bisects a mapping");
  }
  const uint64_t npages4k = size >> kPageShift;
  std::vector<uint64_t> raw;
  try {
    if (IOMM_INJECT("vfio.alloc_bitmap")) throw std::bad_alloc();
    raw.assign((npages4k + 63) / 64, 0);
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory");
  }
  if (Status st = ioas->read_and_clear_dirty(iova, size, raw); !st) return st;
  fold(raw, npages4k, std::countr_zero(pgsize), out);
  return {};
}

}  // namespace iomm::compat
