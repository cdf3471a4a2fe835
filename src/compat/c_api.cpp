// The C ABI of the type1 layer: ioctl argument handling (argsz, flags,
// capability chains) and the group entry points.
#include <linux/vfio.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

#include "compat/container.hpp"
#include "fault/inject.hpp"
#include "iomm/vfio_compat.h"

using iomm::Error;
using iomm::Status;
using iomm::compat::Container;

namespace {

constexpr unsigned kPinPagesMax = 4096 / sizeof(long);    // VFIO_PIN_PAGES_MAX_ENTRIES
constexpr uint64_t kDirtyBitmapPagesMax = 0x7fffffffULL;  // INT_MAX
constexpr uint64_t bitmap_bytes(uint64_t npages) { return ((npages + 63) / 64) * 8; }
constexpr uint64_t kDirtyBitmapSizeMax = bitmap_bytes(kDirtyBitmapPagesMax);

long fail(int err) {
  errno = err;
  return -1;
}

long fail(const Status& s) { return fail(s.code()); }

// type1's vfio_pin_pages/unpin_pages/dma_rw report an IOVA with no mapping,
// and a range that wraps, as EINVAL; the core says ENOENT and EOVERFLOW.
long fail_page_call(const Status& s) {
  return fail(s.code() == ENOENT || s.code() == EOVERFLOW ? EINVAL : s.code());
}

Status verify_bitmap_size(uint64_t npages, uint64_t bitmap_size) {
  if (npages == 0 || bitmap_size == 0 || bitmap_size > kDirtyBitmapSizeMax) {
    return Error(EINVAL, "bad bitmap size");
  }
  if (bitmap_size < bitmap_bytes(npages)) return Error(EINVAL, "bitmap too small");
  return {};
}

// Capability chain builder (vfio_info_cap_add): each capability is 8-byte
// aligned and appended; offsets are relative to the chain until shifted.
class Caps {
 public:
  void* add(size_t size, uint16_t id, uint16_t version) {
    size = (size + 7) & ~size_t{7};
    const size_t at = buf_.size();
    buf_.resize(at + size, 0);
    auto* h = reinterpret_cast<vfio_info_cap_header*>(buf_.data() + at);
    h->id = id;
    h->version = version;
    if (last_ != SIZE_MAX) {
      reinterpret_cast<vfio_info_cap_header*>(buf_.data() + last_)->next =
          static_cast<uint32_t>(at);
    }
    last_ = at;
    return buf_.data() + at;
  }
  [[nodiscard]] size_t size() const { return buf_.size(); }
  // Make every next offset relative to the start of the info struct.
  void shift(size_t by) {
    for (size_t at = 0; at < buf_.size();) {
      auto* h = reinterpret_cast<vfio_info_cap_header*>(buf_.data() + at);
      const size_t next = h->next;
      if (next != 0) h->next = static_cast<uint32_t>(next + by);
      if (next == 0) break;
      at = next;
    }
  }
  [[nodiscard]] const unsigned char* data() const { return buf_.data(); }

 private:
  std::vector<unsigned char> buf_;
  size_t last_ = SIZE_MAX;
};

// Linux 6.6+ rules: the info struct starts zeroed, only the fixed header
// (argsz, flags, iova_pgsizes) is read, and min(argsz, sizeof(info)) bytes
// go back, so cap_offset and the padding are written (as zeros when the
// chain does not fit) as far as argsz reaches.
long get_info(Container& c, void* arg) {
  constexpr size_t minsz = offsetof(vfio_iommu_type1_info, iova_pgsizes) + sizeof(__u64);
  vfio_iommu_type1_info info{};
  std::memcpy(&info, arg, minsz);
  if (info.argsz < minsz) return fail(EINVAL);
  const size_t out = std::min<size_t>(info.argsz, sizeof(info));
  Caps caps;
  try {
    if (IOMM_INJECT("vfio.alloc_info")) throw std::bad_alloc();
    std::lock_guard lk(c.mu);
    // The last group may have gone since the ioctl layer looked.
    if (!c.iommu_set) return fail(EINVAL);
    info.flags = VFIO_IOMMU_INFO_PGSIZES;
    info.iova_pgsizes = c.pgsize_bitmap();
    auto* mig = static_cast<vfio_iommu_type1_info_cap_migration*>(caps.add(
        sizeof(vfio_iommu_type1_info_cap_migration), VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, 1));
    mig->flags = 0;
    mig->pgsize_bitmap = c.min_pgsize();
    mig->max_dirty_bitmap_size = kDirtyBitmapSizeMax;
    auto* avail = static_cast<vfio_iommu_type1_info_dma_avail*>(
        caps.add(sizeof(vfio_iommu_type1_info_dma_avail), VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, 1));
    avail->avail = c.limit - static_cast<uint32_t>(c.dmas.size());
    if (c.has_domain()) {
      const auto ranges = c.ioas->iova_ranges();
      const size_t size =
          sizeof(vfio_iommu_type1_info_cap_iova_range) + ranges.size() * sizeof(vfio_iova_range);
      auto* cap = static_cast<vfio_iommu_type1_info_cap_iova_range*>(
          caps.add(size, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1));
      cap->nr_iovas = static_cast<__u32>(ranges.size());
      for (size_t i = 0; i < ranges.size(); ++i) {
        cap->iova_ranges[i].start = ranges[i].start;
        cap->iova_ranges[i].end = ranges[i].last;
      }
    }
  } catch (const std::bad_alloc&) {
    return fail(ENOMEM);
  }
  if (caps.size() != 0) {
    info.flags |= VFIO_IOMMU_INFO_CAPS;
    if (info.argsz < sizeof(info) + caps.size()) {
      info.argsz = static_cast<__u32>(sizeof(info) + caps.size());
    } else {
      caps.shift(sizeof(info));
      std::memcpy(static_cast<unsigned char*>(arg) + sizeof(info), caps.data(), caps.size());
      info.cap_offset = sizeof(info);
    }
  }
  std::memcpy(arg, &info, out);
  return 0;
}

long map_dma(Container& c, void* arg) {
  constexpr size_t minsz = offsetof(vfio_iommu_type1_dma_map, size) + sizeof(__u64);
  constexpr uint32_t mask =
      VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE | VFIO_DMA_MAP_FLAG_VADDR;
  vfio_iommu_type1_dma_map map{};
  std::memcpy(&map, arg, minsz);
  if (map.argsz < minsz || (map.flags & ~mask) != 0) return fail(EINVAL);
  uint32_t prot = 0;
  if ((map.flags & VFIO_DMA_MAP_FLAG_READ) != 0) prot |= iomm::kProtRead;
  if ((map.flags & VFIO_DMA_MAP_FLAG_WRITE) != 0) prot |= iomm::kProtWrite;
  Status s = c.map(map.iova, map.size, map.vaddr, (map.flags & VFIO_DMA_MAP_FLAG_VADDR) != 0, prot);
  return s ? 0 : fail(s);
}

long unmap_dma(Container& c, void* arg) {
  constexpr size_t minsz = offsetof(vfio_iommu_type1_dma_unmap, size) + sizeof(__u64);
  constexpr uint32_t mask =
      VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP | VFIO_DMA_UNMAP_FLAG_VADDR | VFIO_DMA_UNMAP_FLAG_ALL;
  vfio_iommu_type1_dma_unmap unmap{};
  std::memcpy(&unmap, arg, minsz);
  if (unmap.argsz < minsz || (unmap.flags & ~mask) != 0) return fail(EINVAL);
  const bool dirty = (unmap.flags & VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP) != 0;
  if (dirty && (unmap.flags & (VFIO_DMA_UNMAP_FLAG_ALL | VFIO_DMA_UNMAP_FLAG_VADDR)) != 0) {
    return fail(EINVAL);
  }
  vfio_bitmap bitmap{};
  if (dirty) {
    if (unmap.argsz < minsz + sizeof(bitmap)) return fail(EINVAL);
    std::memcpy(&bitmap, static_cast<unsigned char*>(arg) + minsz, sizeof(bitmap));
    if (bitmap.data == nullptr || bitmap.pgsize == 0) return fail(EINVAL);
    const unsigned shift = __builtin_ctzll(bitmap.pgsize);
    if (Status s = verify_bitmap_size(unmap.size >> shift, bitmap.size); !s) return fail(s);
  }
  std::vector<uint64_t> words;
  if (dirty) {
    try {
      if (IOMM_INJECT("vfio.alloc_bitmap")) throw std::bad_alloc();
      words.assign((bitmap.size + 7) / 8, 0);
    } catch (const std::bad_alloc&) {
      return fail(ENOMEM);
    }
  }
  uint64_t unmapped = 0;
  Status s = c.unmap(unmap.iova, unmap.size, (unmap.flags & VFIO_DMA_UNMAP_FLAG_ALL) != 0,
                     (unmap.flags & VFIO_DMA_UNMAP_FLAG_VADDR) != 0, &unmapped,
                     dirty ? bitmap.pgsize : 0, words);
  // Like the kernel, nothing goes back on failure: the caller's struct stays
  // exactly as it was passed.
  if (!s) return fail(s);
  if (dirty) {
    // The bitmap covers the requested range, holes included: each mapping's
    // bits sit at (its iova - iova) / pgsize.
    const uint64_t n = bitmap_bytes(unmap.size >> __builtin_ctzll(bitmap.pgsize));
    std::memcpy(bitmap.data, words.data(), std::min<uint64_t>(n, bitmap.size));
  }
  unmap.size = unmapped;
  std::memcpy(arg, &unmap, minsz);
  return 0;
}

long dirty_pages(Container& c, void* arg) {
  constexpr size_t minsz = offsetof(vfio_iommu_type1_dirty_bitmap, flags) + sizeof(__u32);
  constexpr uint32_t mask = VFIO_IOMMU_DIRTY_PAGES_FLAG_START | VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP |
                            VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP;
  if (!c.v2.load()) return fail(EACCES);
  vfio_iommu_type1_dirty_bitmap dirty{};
  std::memcpy(&dirty, arg, minsz);
  if (dirty.argsz < minsz || (dirty.flags & ~mask) != 0) return fail(EINVAL);
  if (dirty.flags == 0 || (dirty.flags & (dirty.flags - 1)) != 0) return fail(EINVAL);
  if ((dirty.flags & VFIO_IOMMU_DIRTY_PAGES_FLAG_START) != 0) {
    std::lock_guard lk(c.mu);
    // v2 was read without the lock: the IOMMU may have gone since.
    if (!c.iommu_set) return fail(EACCES);
    if (!c.dirty_tracking) {
      c.ioas->set_dirty_tracking(true);
      c.dirty_tracking = true;
    }
    return 0;
  }
  if ((dirty.flags & VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP) != 0) {
    std::lock_guard lk(c.mu);
    // v2 was read without the lock: the IOMMU may have gone since.
    if (!c.iommu_set) return fail(EACCES);
    if (c.dirty_tracking) {
      c.ioas->set_dirty_tracking(false);
      c.dirty_tracking = false;
    }
    return 0;
  }
  const size_t data_size = dirty.argsz - minsz;
  vfio_iommu_type1_dirty_bitmap_get range{};
  if (data_size < sizeof(range)) return fail(EINVAL);
  std::memcpy(&range, static_cast<unsigned char*>(arg) + minsz, sizeof(range));
  if (range.iova + range.size < range.iova) return fail(EINVAL);
  if (range.bitmap.data == nullptr || range.bitmap.pgsize == 0) return fail(EINVAL);
  const unsigned shift = __builtin_ctzll(range.bitmap.pgsize);
  if (Status s = verify_bitmap_size(range.size >> shift, range.bitmap.size); !s) return fail(s);
  std::vector<uint64_t> words;
  try {
    if (IOMM_INJECT("vfio.alloc_bitmap")) throw std::bad_alloc();
    words.assign((range.bitmap.size + 7) / 8, 0);
  } catch (const std::bad_alloc&) {
    return fail(ENOMEM);
  }
  if (Status s = c.dirty_get(range.iova, range.size, range.bitmap.pgsize, words); !s) {
    return fail(s);
  }
  std::memcpy(range.bitmap.data, words.data(),
              std::min<uint64_t>(bitmap_bytes(range.size >> shift), range.bitmap.size));
  return 0;
}

// One call in flight on a container (closing waits for it).
class CallGuard {
 public:
  explicit CallGuard(Container& c) noexcept : c_(c) { c_.enter(); }
  ~CallGuard() { c_.leave(); }
  CallGuard(const CallGuard&) = delete;
  CallGuard& operator=(const CallGuard&) = delete;

 private:
  Container& c_;
};

// What a group entry point works with: the container (entered, so closing
// it waits for us) and the access, both read under the group's link_mu so
// a concurrent detach or close cannot free them under us.
class GroupCall {
 public:
  explicit GroupCall(iomm_vfio_group* g) {
    std::lock_guard link(g->link_mu);
    container_ = g->container;
    if (container_ == nullptr) return;
    container_->enter();
    access_ = g->access;
  }
  ~GroupCall() {
    access_.reset();  // may be the last reference: before leave()
    if (container_ != nullptr) container_->leave();
  }
  GroupCall(const GroupCall&) = delete;
  GroupCall& operator=(const GroupCall&) = delete;
  [[nodiscard]] Container* container() const { return container_; }
  [[nodiscard]] iomm::Access* access() const { return access_.get(); }

 private:
  Container* container_ = nullptr;
  std::shared_ptr<iomm::Access> access_;
};

}  // namespace

// No C++ exception may cross the C ABI: an allocation failure anywhere below
// (a container, an error message) becomes the call's error value with ENOMEM.
template <typename R, typename F>
R c_boundary(R on_error, F body) noexcept {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    errno = ENOMEM;
  } catch (...) {
    errno = EIO;
  }
  return on_error;
}

extern "C" {

iomm_vfio_container* iomm_vfio_open(void) {
  return c_boundary<iomm_vfio_container*>(nullptr, [&]() -> iomm_vfio_container* {
    auto* c =
        IOMM_INJECT("vfio.alloc_container") ? nullptr : new (std::nothrow) iomm_vfio_container;
    if (c == nullptr) errno = ENOMEM;
    return c;
  });
}

int iomm_vfio_close(iomm_vfio_container* c) {
  return c_boundary<int>(0, [&]() -> int {
    if (c == nullptr) return 0;
    c->c.close();
    delete c;
    return 0;
  });
}

long iomm_vfio_ioctl(iomm_vfio_container* h, unsigned long request, void* arg) {
  return c_boundary<long>(-1L, [&]() -> long {
    if (h == nullptr) return fail(EBADF);
    Container& c = h->c;
    const CallGuard call(c);
    switch (request) {
      case VFIO_GET_API_VERSION:
        return VFIO_API_VERSION;
      case VFIO_CHECK_EXTENSION:
        return *c.check_extension(reinterpret_cast<unsigned long>(arg));
      case VFIO_SET_IOMMU: {
        Status s = c.set_iommu(reinterpret_cast<unsigned long>(arg));
        return s ? 0 : fail(s);
      }
      default:
        break;
    }
    {
      // Without an IOMMU driver, the container passes nothing on: EINVAL.
      std::lock_guard lk(c.mu);
      if (!c.iommu_set) return fail(EINVAL);
    }
    if (arg == nullptr && (request == VFIO_IOMMU_GET_INFO || request == VFIO_IOMMU_MAP_DMA ||
                           request == VFIO_IOMMU_UNMAP_DMA || request == VFIO_IOMMU_DIRTY_PAGES)) {
      return fail(EFAULT);
    }
    switch (request) {
      case VFIO_IOMMU_GET_INFO:
        return get_info(c, arg);
      case VFIO_IOMMU_MAP_DMA:
        return map_dma(c, arg);
      case VFIO_IOMMU_UNMAP_DMA:
        return unmap_dma(c, arg);
      case VFIO_IOMMU_DIRTY_PAGES:
        return dirty_pages(c, arg);
      default:
        return fail(ENOTTY);
    }
  });
}

int iomm_vfio_set_dma_entry_limit(iomm_vfio_container* h, uint32_t limit) {
  return c_boundary<int>(-1, [&]() -> int {
    if (h == nullptr) return static_cast<int>(fail(EBADF));
    std::lock_guard lk(h->c.mu);
    if (h->c.iommu_set) return static_cast<int>(fail(EBUSY));
    if (limit == 0) return static_cast<int>(fail(EINVAL));
    h->c.limit = limit;
    return 0;
  });
}

int iomm_vfio_set_owner_pid(iomm_vfio_container* h, int pid) {
  return c_boundary<int>(-1, [&]() -> int {
    if (h == nullptr || pid < 0) return static_cast<int>(fail(EINVAL));
    std::lock_guard lk(h->c.mu);
    h->c.owner_pid = pid;
    return 0;
  });
}

iomm_vfio_group* iomm_vfio_group_create_software(iomm_vfio_container* h,
                                                 const iomm_vfio_sw_group_config* cfg) {
  return c_boundary<iomm_vfio_group*>(nullptr, [&]() -> iomm_vfio_group* {
    if (h == nullptr) {
      errno = EINVAL;
      return nullptr;
    }
    auto* g = IOMM_INJECT("vfio.alloc_group") ? nullptr : new (std::nothrow) iomm_vfio_group;
    if (g == nullptr) {
      errno = ENOMEM;
      return nullptr;
    }
    iomm::DomainConfig dc;
    uint64_t bitmap = iomm::kPageSize | iomm::kPageSize2M | iomm::kPageSize1G;
    if (cfg != nullptr) {
      if (cfg->aperture_start != 0 || cfg->aperture_last != 0) {
        dc.aperture_start = cfg->aperture_start;
        dc.aperture_last = cfg->aperture_last;
      }
      if (cfg->pgsize_bitmap != 0) bitmap = cfg->pgsize_bitmap;
      for (uint32_t i = 0; i < cfg->nr_reserved; ++i) {
        dc.reserved.push_back({cfg->reserved[i].start, cfg->reserved[i].last});
      }
    }
    const uint64_t min = bitmap & -bitmap;
    if (min < iomm::kPageSize) {
      delete g;
      errno = EINVAL;
      return nullptr;
    }
    dc.min_page_size = min;
    dc.page_sizes =
        (bitmap & (iomm::kPageSize | iomm::kPageSize2M | iomm::kPageSize1G)) | iomm::kPageSize;
    auto d = iomm::SoftDomain::create(dc);
    if (!d.ok()) {
      delete g;
      errno = d.code();
      return nullptr;
    }
    g->container = &h->c;
    g->config = dc;
    g->pgsize_bitmap = bitmap;
    g->domain = std::move(d).value();
    if (Status s = h->c.add_group(g); !s) {
      delete g;
      errno = s.code();
      return nullptr;
    }
    return g;
  });
}

iomm_vfio_group* iomm_vfio_group_create_mediated(iomm_vfio_container* h,
                                                 iomm_vfio_dma_unmap_fn dma_unmap, void* opaque) {
  return c_boundary<iomm_vfio_group*>(nullptr, [&]() -> iomm_vfio_group* {
    if (h == nullptr || dma_unmap == nullptr) {
      errno = EINVAL;
      return nullptr;
    }
    auto* g = IOMM_INJECT("vfio.alloc_group") ? nullptr : new (std::nothrow) iomm_vfio_group;
    if (g == nullptr) {
      errno = ENOMEM;
      return nullptr;
    }
    try {
      if (IOMM_INJECT("vfio.alloc_group")) throw std::bad_alloc();
      g->notifier = std::make_shared<iomm::compat::UnmapNotifier>(dma_unmap, opaque);
    } catch (const std::bad_alloc&) {
      delete g;
      errno = ENOMEM;
      return nullptr;
    }
    g->container = &h->c;
    g->mediated = true;
    if (Status s = h->c.add_group(g); !s) {
      delete g;
      errno = s.code();
      return nullptr;
    }
    return g;
  });
}

int iomm_vfio_group_destroy(iomm_vfio_group* g) {
  return c_boundary<int>(0, [&]() -> int {
    if (g == nullptr) return 0;
    Container::Released released;
    {
      const GroupCall call(g);
      if (call.container() != nullptr) released = call.container()->remove_group(g);
    }
    // With no lock held: no callback runs after this, then the pins go, then
    // (for the last group) every mapping.
    if (g->notifier != nullptr) g->notifier->stop();
    released.access.reset();
    released.ioas.reset();
    delete g;
    return 0;
  });
}

int iomm_vfio_pin_pages(iomm_vfio_group* g, uint64_t iova, int npage, int prot, void** host) {
  return c_boundary<int>(-1, [&]() -> int {
    if (g == nullptr || !g->mediated) return static_cast<int>(fail(EINVAL));
    if (npage <= 0 || host == nullptr) return static_cast<int>(fail(EINVAL));
    if (static_cast<unsigned>(npage) > kPinPagesMax) return static_cast<int>(fail(E2BIG));
    const GroupCall call(g);
    if (call.access() == nullptr) return static_cast<int>(fail(EINVAL));
    const Container& c = *call.container();
    if (!c.v2.load(std::memory_order_relaxed)) return static_cast<int>(fail(EACCES));
    if (c.vaddr_invalid.load(std::memory_order_relaxed) != 0) return static_cast<int>(fail(EBUSY));
    const uint32_t p = ((prot & IOMM_VFIO_PROT_READ) != 0 ? iomm::kProtRead : 0U) |
                       ((prot & IOMM_VFIO_PROT_WRITE) != 0 ? iomm::kProtWrite : 0U);
    if (p == 0) return static_cast<int>(fail(EINVAL));
    Status s = call.access()->pin_pages(iova, static_cast<uint64_t>(npage), p, host);
    if (!s) return static_cast<int>(fail_page_call(s));
    return npage;
  });
}

int iomm_vfio_unpin_pages(iomm_vfio_group* g, uint64_t iova, int npage) {
  return c_boundary<int>(-1, [&]() -> int {
    if (g == nullptr || !g->mediated || npage <= 0) return static_cast<int>(fail(EINVAL));
    if (static_cast<unsigned>(npage) > kPinPagesMax) return static_cast<int>(fail(E2BIG));
    const GroupCall call(g);
    if (call.access() == nullptr) return static_cast<int>(fail(EINVAL));
    Status s = call.access()->unpin_pages(iova, static_cast<uint64_t>(npage));
    return s ? npage : static_cast<int>(fail_page_call(s));
  });
}

int iomm_vfio_dma_rw(iomm_vfio_group* g, uint64_t iova, void* data, size_t len, int write) {
  return c_boundary<int>(-1, [&]() -> int {
    if (g == nullptr || !g->mediated) return static_cast<int>(fail(EINVAL));
    const GroupCall call(g);
    if (call.access() == nullptr) return static_cast<int>(fail(EINVAL));
    if (call.container()->vaddr_invalid.load(std::memory_order_relaxed) != 0) {
      return static_cast<int>(fail(EBUSY));
    }
    Status s =
        write != 0 ? call.access()->write(iova, data, len) : call.access()->read(iova, data, len);
    if (!s) return static_cast<int>(fail_page_call(s));
    return 0;
  });
}

int iomm_vfio_group_dma_rw(iomm_vfio_group* g, uint64_t iova, void* data, size_t len, int write) {
  return c_boundary<int>(-1, [&]() -> int {
    if (g == nullptr || g->mediated || !g->attached) return static_cast<int>(fail(EINVAL));
    Status s =
        write != 0 ? g->domain->dma_write(iova, data, len) : g->domain->dma_read(iova, data, len);
    // A DMA running past the top of the IOVA space is an IOMMU fault to the
    // device, like any other unmapped IOVA.
    if (!s) return static_cast<int>(fail(s.code() == EOVERFLOW ? EFAULT : s.code()));
    return 0;
  });
}

}  // extern "C"
