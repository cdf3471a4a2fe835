// Fuzzer for the VFIO type1 container interface (include/iomm/vfio_compat.h).
//
// Each input is a program against one live container with a software group
// and a mediated group: a 4-byte header (dma entry limit, software group
// config, whether to SET_IOMMU at once and with which type), then operations:
// one opcode byte and its argument bytes (bytes past the end read as 0).
// Most operations are iomm_vfio_ioctl() calls with a request number (mostly
// the real VFIO_* ones from <linux/vfio.h>, sometimes garbage) and struct
// bytes taken from the input, with argsz fuzzed; the harness only fixes
// pointers inside the structs (vaddr, bitmap data) to point at memory it
// owns, or at memory that is deliberately unmapped, and never claims an argsz
// larger than the buffer it passes (the kernel would fault; here it would be
// the harness's own overflow).
//
// Checked after every call:
// - no crash, no sanitizer report;
// - a -1 return sets a positive errno that the call's contract (or type1's
//   uapi) lists, and nothing else negative is returned;
// - a failed call changed nothing: the pinned and charged bytes and VmLck
//   are what they were before it;
// - VmLck always equals the pinned bytes;
// - a successful MAP_DMA overlaps no mapping of the shadow (Type1Shadow) and
//   a successful UNMAP_DMA reports exactly the bytes of the shadow's mappings
//   it removes, by the type1v2 or the type1 (v1) rule;
// - a failed call left the caller's struct byte for byte as it was; a
//   successful one wrote only what it may (UNMAP_DMA: size; GET_INFO: its
//   first min(argsz, sizeof) bytes, zero-filled, and the capability chain);
// - a successful GET_BITMAP with 4 KiB bits reports exactly the pages the
//   shadow saw written since tracking started or the last read, plus the
//   pages the mediated driver holds pinned (not checked where a failed
//   write touched the range).
// At the end the container is closed: every counter and VmLck must be zero.
#include <linux/vfio.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <vector>

#include "fuzz_common.hpp"
#include "iomm/accounting.hpp"
#include "iomm/vfio_compat.h"

namespace {

using iomm::fuzz::Reader;

constexpr size_t kArgBuf = 4096;     // struct bytes passed to ioctl
constexpr size_t kBitmapBuf = 4096;  // dirty bitmap buffer
constexpr size_t kMaxSteps = 64;
constexpr uint64_t kPage = 4096;

struct Memory {
  uint8_t* anon = nullptr;  // anonymous read-write memory
  size_t anon_size = 256 * 1024;
  uint8_t* shared = nullptr;  // a memfd mapped MAP_SHARED (pinned as file pages)
  size_t shared_size = 1 << 20;
  uint8_t* none = nullptr;  // PROT_NONE (a bad vaddr)
  size_t none_size = 64 * 1024;
  bool charged = true;
};
Memory* mem = nullptr;

void setup() {
  mem = new Memory();
  mem->charged = iomm::fuzz::drop_ipc_lock();
  // A configured limit well below the kernel's RLIMIT_MEMLOCK (the real mlock
  // is bound by it once CAP_IPC_LOCK is gone).
  (void)iomm::set_memlock_limit(iomm::AccountMode::per_process, 0, 2 << 20);
  void* p =
      mmap(nullptr, mem->anon_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  const int fd = memfd_create("iomm-fuzz-vfio", MFD_CLOEXEC);
  if (p == MAP_FAILED || fd < 0 || ftruncate(fd, static_cast<off_t>(mem->shared_size)) != 0) {
    std::abort();
  }
  mem->anon = static_cast<uint8_t*>(p);
  void* s = mmap(nullptr, mem->shared_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  void* n = mmap(nullptr, mem->none_size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (s == MAP_FAILED || n == MAP_FAILED) std::abort();
  close(fd);  // the mapping keeps the file; the library reopens it through /proc
  mem->shared = static_cast<uint8_t*>(s);
  mem->none = static_cast<uint8_t*>(n);
}

// Values a type1 user would plausibly pass, plus edges.
constexpr uint64_t kIovaTable[] = {
    0,         0x1000,     0x2000,     0x10000,    0x100000,           0x200000,
    0x1000000, 0xfee00000, 1ULL << 39, 1ULL << 48, UINT64_MAX - 0xfff, UINT64_MAX,
    0x800,     1};
constexpr uint64_t kSizeTable[] = {0,          1,       0x1000,   0x2000,   0x3000,
                                   0x10000,    0x40000, 0x100000, 0x200000, 1ULL << 32,
                                   UINT64_MAX, 0x800,   0x1001};

uint64_t pick(Reader& in, const uint64_t* table, size_t n) {
  const uint8_t b = in.u8();
  if (b < n) return table[b];
  if (b == 0xff) return in.u64();
  return (b - n) * kPage;
}
uint64_t pick_iova(Reader& in) { return pick(in, kIovaTable, std::size(kIovaTable)); }
uint64_t pick_size(Reader& in) { return pick(in, kSizeTable, std::size(kSizeTable)); }

// A vaddr: inside the shared file mapping, inside anonymous memory, in the
// PROT_NONE region, or raw.
uint64_t pick_vaddr(Reader& in, uint64_t size) {
  const uint8_t b = in.u8();
  const uint64_t off = static_cast<uint64_t>(in.u8()) * kPage + ((b & 0x80) != 0 ? 0x800 : 0);
  // Kernel half of the address space: never mapped in user space, however
  // long the range, so a map of it must fail (or stay lazy) and no pin, rw or
  // DMA through it can reach memory.
  constexpr uint64_t kNeverMapped = 0xffff800000000000ULL;
  auto within = [&](uint8_t* base, size_t len) {
    // Keep [vaddr, vaddr + size) inside the region. A size that does not fit
    // gets a range that is unmapped in its entirety: starting it in the
    // PROT_NONE region would let its tail reach whatever is mapped after it,
    // and a lazy MAP_DMA plus a mediated write would corrupt the harness.
    if (size > len) return kNeverMapped + off;
    uint64_t o = off % len;
    if (o + size > len) o = (len - size) & ~(kPage - 1);
    return reinterpret_cast<uint64_t>(base) + o;
  };
  switch (b % 5) {
    case 0:
    case 1:
      return within(mem->shared, mem->shared_size);
    case 2:
      return within(mem->anon, mem->anon_size);
    case 3:
      return within(mem->none, mem->none_size);
    default: {
      // Addresses that are surely not mapped here (never a raw value: a
      // DMA write through a stray vaddr would corrupt the harness itself).
      const uint64_t bad[] = {0, kPage, 0xffff800000001000ULL, UINT64_MAX & ~(kPage - 1)};
      return bad[(b >> 3) % std::size(bad)];
    }
  }
}

// The mediated driver: per-page pin counts (vfio_pin_pages pins pages, and
// any pinned page can be unpinned on its own), dropped for the range an
// unmap covers.
struct Mediated {
  std::mutex mu;
  iomm_vfio_group* group = nullptr;
  std::map<uint64_t, int> pins;  // page iova -> pin count; guarded by mu
  uint64_t callbacks = 0;

  // Whether every page of [iova, +npage) is pinned (no wrap).
  bool all_pinned(uint64_t iova, int npage) const {
    if (npage <= 0 || (iova & (kPage - 1)) != 0) return false;
    for (int i = 0; i < npage; ++i) {
      const uint64_t page = iova + static_cast<uint64_t>(i) * kPage;
      if (page < iova) return false;
      auto it = pins.find(page);
      if (it == pins.end() || it->second == 0) return false;
    }
    return true;
  }
  void add(uint64_t iova, int npage, int delta) {
    for (int i = 0; i < npage; ++i) {
      const uint64_t page = iova + static_cast<uint64_t>(i) * kPage;
      if ((pins[page] += delta) == 0) pins.erase(page);
    }
  }
};
Mediated* med = nullptr;

void on_dma_unmap(void* opaque, uint64_t iova, uint64_t size) {
  auto* m = static_cast<Mediated*>(opaque);
  FUZZ_CHECK(m == med && size > 0, "dma_unmap callback with opaque %p, size %#lx", opaque, size);
  std::lock_guard lk(m->mu);
  ++m->callbacks;
  const uint64_t last = iova + size - 1;
  for (auto it = m->pins.lower_bound(iova); it != m->pins.end() && it->first <= last;) {
    for (int i = 0; i < it->second; ++i) {
      const int r = iomm_vfio_unpin_pages(m->group, it->first, 1);
      FUZZ_CHECK(r == 1, "unpin of a held page %#lx in dma_unmap failed: %d errno %d", it->first, r,
                 errno);
    }
    it = m->pins.erase(it);
  }
}

// A type1 shadow of the container: whether an IOMMU is set and of which
// type, and the mappings (iova -> size) that successful calls made. It
// predicts the outputs of successful calls: MAP_DMA never overlaps a mapping
// (VADDR: matches one exactly), UNMAP_DMA reports exactly the bytes of the
// mappings it removes, by the v2 rule (no bisection: whole mappings inside
// the range) or the v1 rule (a request starting inside a mapping unmaps
// nothing; otherwise every mapping starting in the range goes, whole). A
// failed call must leave the caller's struct as it was (check_written_back).
struct Type1Shadow {
  int groups = 0;
  bool v2 = false;
  std::map<uint64_t, uint64_t> maps;
  // The dirty log: whether tracking is on, the 4 KiB pages written since it
  // was switched on or the pages were read, and the pages of writes that
  // failed (which may or may not have marked them: a GET_BITMAP over one is
  // not predicted).
  bool tracking = false;
  std::set<uint64_t> dirty, unsure;

  void forget_dirty(uint64_t first_page, uint64_t last_page) {
    for (auto* set : {&dirty, &unsure}) {
      set->erase(set->lower_bound(first_page), set->upper_bound(last_page));
    }
  }
  void wrote(uint64_t iova, uint64_t len, bool ok) {
    if (!tracking || len == 0 || iova + len - 1 < iova) return;
    for (uint64_t p = iova / kPage; p <= (iova + len - 1) / kPage; ++p)
      (ok ? dirty : unsure).insert(p);
  }
  void dirty_pages_call(const vfio_iommu_type1_dirty_bitmap& d) {
    if ((d.flags & VFIO_IOMMU_DIRTY_PAGES_FLAG_START) != 0 && !tracking) {
      tracking = true;  // switching on clears the log; already on, nothing changes
      forget_dirty(0, UINT64_MAX);
    }
    if ((d.flags & VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP) != 0 && tracking) {
      tracking = false;
      forget_dirty(0, UINT64_MAX);
    }
    if ((d.flags & VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP) != 0) {
      const auto* get = reinterpret_cast<const vfio_iommu_type1_dirty_bitmap_get*>(d.data);
      check_bitmap(*get);
    }
  }
  // A successful GET_BITMAP with 4 KiB bits: exactly the pages written plus
  // the pages the mediated driver holds pinned, unless a failed write
  // touched the range. The read clears the range.
  void check_bitmap(const vfio_iommu_type1_dirty_bitmap_get& get);

  void group_created() { ++groups; }
  void group_destroyed() {
    // The last group leaving releases the IOMMU and every mapping.
    if (--groups == 0) {
      v2 = false;
      maps.clear();
      tracking = false;
      forget_dirty(0, UINT64_MAX);
    }
  }
  void iommu_set(unsigned long type) { v2 = type != VFIO_TYPE1_IOMMU; }

  void mapped(const vfio_iommu_type1_dma_map& m) {
    const uint64_t last = m.iova + m.size - 1;
    if ((m.flags & VFIO_DMA_MAP_FLAG_VADDR) != 0) {
      auto it = maps.find(m.iova);
      FUZZ_CHECK(it != maps.end() && it->second == m.size,
                 "MAP_DMA VADDR of [%#llx, +%#llx) succeeded without that exact mapping",
                 static_cast<unsigned long long>(m.iova), static_cast<unsigned long long>(m.size));
      return;
    }
    for (const auto& [iova, size] : maps) {
      FUZZ_CHECK(iova + size - 1 < m.iova || iova > last,
                 "MAP_DMA of [%#llx, +%#llx) succeeded over the mapping [%#lx, +%#lx)",
                 static_cast<unsigned long long>(m.iova), static_cast<unsigned long long>(m.size),
                 iova, size);
    }
    maps.emplace(m.iova, m.size);
  }

  void unmapped(const vfio_iommu_type1_dma_unmap& u, uint64_t iova, uint64_t size) {
    const bool all = (u.flags & VFIO_DMA_UNMAP_FLAG_ALL) != 0;
    const uint64_t last = iova + size - 1;
    uint64_t want = 0;
    std::vector<uint64_t> gone;
    // v1: a request starting inside a mapping unmaps nothing (size 0); else
    // it removes every mapping starting in [iova, last], whole, even past last.
    const bool v1_inside = !v2 && !all && std::any_of(maps.begin(), maps.end(), [&](const auto& e) {
      return e.first < iova && e.first + e.second - 1 >= iova;
    });
    for (const auto& [start, len] : maps) {
      if (v1_inside) break;
      if (!v2 && !all && (start < iova || start > last)) continue;
      if (!all && (start + len - 1 < iova || start > last)) continue;
      FUZZ_CHECK(all || !v2 || (start >= iova && start + len - 1 <= last),
                 "v2 UNMAP_DMA of [%#lx, +%#lx) succeeded bisecting [%#lx, +%#lx)", iova, size,
                 start, len);
      want += len;
      gone.push_back(start);
    }
    FUZZ_CHECK(u.size == want, "UNMAP_DMA of [%#lx, +%#lx) reported %#llx bytes, shadow %#lx", iova,
               size, static_cast<unsigned long long>(u.size), want);
    if ((u.flags & VFIO_DMA_UNMAP_FLAG_VADDR) != 0) return;  // the mappings stay
    // The log is cleared over the span of the removed mappings.
    if (!gone.empty()) {
      forget_dirty(gone.front() / kPage, (gone.back() + maps[gone.back()] - 1) / kPage);
    }
    for (uint64_t start : gone) maps.erase(start);
  }
};
Type1Shadow* shadow = nullptr;

void Type1Shadow::check_bitmap(const vfio_iommu_type1_dirty_bitmap_get& get) {
  const uint64_t first = get.iova / kPage;
  const uint64_t npages = get.size / kPage;
  const bool exact = get.bitmap.pgsize == kPage && get.size % kPage == 0 &&
                     unsure.lower_bound(first) == unsure.upper_bound(first + npages - 1);
  if (exact && npages <= get.bitmap.size * 8) {
    const auto* bits = reinterpret_cast<const uint8_t*>(get.bitmap.data);
    std::lock_guard lk(med->mu);
    for (uint64_t i = 0; i < npages; ++i) {
      const uint64_t page = first + i;
      const bool want = dirty.count(page) != 0 || med->pins.count(page * kPage) != 0;
      const bool got = ((bits[i / 8] >> (i % 8)) & 1) != 0;
      FUZZ_CHECK(got == want, "GET_BITMAP page %#lx: dirty %d, shadow %d (written %d, pinned %d)",
                 page * kPage, got, want, dirty.count(page) != 0,
                 med->pins.count(page * kPage) != 0);
    }
  }
  forget_dirty(first, first + npages - 1);
}

struct Snapshot {
  uint64_t pinned;
  uint64_t simulated;
  uint64_t charged;
  uint64_t vmlck;
  bool operator==(const Snapshot&) const = default;
};

Snapshot snapshot() {
  const iomm::Counters c = iomm::counters();
  FUZZ_CHECK(c.vmlck_bytes == c.pinned_bytes, "VmLck %#lx != pinned %#lx", c.vmlck_bytes,
             c.pinned_bytes);
  return {c.pinned_bytes, c.simulated_pinned_bytes, c.charged_bytes, c.vmlck_bytes};
}

// A call's result: -1 with a listed errno and no change, or success.
bool g_trace = false;         // IOMM_FUZZ_TRACE=1: print every checked call
unsigned long g_request = 0;  // the last ioctl request (for the trace)

void check_result(long r, int err, const Snapshot& before, const char* call,
                  std::initializer_list<int> allowed) {
  if (g_trace) {
    std::fprintf(stderr, "step %2d %-28s", iomm::fuzz::g_step_index, call);
    if (std::strcmp(call, "iomm_vfio_ioctl") == 0) std::fprintf(stderr, " %#010lx", g_request);
    std::fprintf(stderr, " -> %ld %s\n", r, r < 0 ? iomm::errno_name(err) : "");
  }
  if (r >= 0) {
    snapshot();
    return;
  }
  FUZZ_CHECK(r == -1, "%s returned %ld", call, r);
  FUZZ_CHECK(err > 0, "%s returned -1 with errno %d", call, err);
  bool listed = false;
  for (int e : allowed) listed = listed || e == err;
  FUZZ_CHECK(listed, "%s failed with %s (%d), which its contract does not list", call,
             iomm::errno_name(err), err);
  const Snapshot after = snapshot();
  FUZZ_CHECK(after == before,
             "failed %s (%s) changed state: pinned %#lx -> %#lx, charged %#lx -> %#lx", call,
             iomm::errno_name(err), before.pinned, after.pinned, before.charged, after.charged);
}

// Every errno the type1 uapi may return from these requests.
#define TYPE1_ERRNOS \
  EINVAL, EFAULT, ENOMEM, EPERM, EEXIST, ENOENT, EBUSY, ENOSPC, EACCES, ENOTTY, ENODEV

constexpr unsigned long kRequests[] = {
    VFIO_GET_API_VERSION,
    VFIO_CHECK_EXTENSION,
    VFIO_SET_IOMMU,
    VFIO_IOMMU_GET_INFO,
    VFIO_IOMMU_MAP_DMA,
    VFIO_IOMMU_UNMAP_DMA,
    VFIO_IOMMU_DIRTY_PAGES,
    // Real VFIO requests that a container does not take.
    VFIO_GROUP_GET_STATUS,
    VFIO_DEVICE_GET_INFO,
    VFIO_IOMMU_ENABLE,
    VFIO_IOMMU_DISABLE,
    VFIO_IOMMU_SPAPR_TCE_GET_INFO,
};

// Struct bytes for a request: the input's bytes, then the fields the
// harness owns. Returns the argsz the harness passes.
struct Arg {
  alignas(8) uint8_t buf[kArgBuf];
};
Arg* g_arg = nullptr;
uint8_t* g_bitmap = nullptr;

uint32_t pick_argsz(Reader& in, uint32_t natural) {
  const uint8_t b = in.u8();
  switch (b % 8) {
    case 0:
      return 0;
    case 1:
      return natural > 0 ? natural - 1 : 0;
    case 2:
      return natural + 8;
    case 3:
      return static_cast<uint32_t>(in.u16() % (kArgBuf + 1));
    case 4:
      return kArgBuf;
    default:
      return natural;
  }
}

void fill_bitmap(Reader& in, vfio_bitmap* bm, uint64_t size) {
  const uint8_t b = in.u8();
  bm->pgsize = (b & 3) == 0 ? static_cast<uint64_t>(1) << (in.u8() % 64) : kPage;
  bm->size = (b & 4) != 0 ? in.u16() % (kBitmapBuf + 1)
                          : std::min<uint64_t>(kBitmapBuf, ((size / kPage + 63) / 64) * 8);
  bm->data = (b & 8) != 0 ? nullptr : reinterpret_cast<__u64*>(g_bitmap);
}

// What a call may write into the caller's struct (the kernel's rules): a
// failed call nothing; MAP_DMA and DIRTY_PAGES nothing (DIRTY_PAGES writes
// only the bitmap, outside the struct); a successful UNMAP_DMA only `size`;
// a successful GET_INFO only its first min(argsz, sizeof(info)) bytes (Linux
// 6.6+: a zero-filled struct, so the padding reads 0), and with the capability
// chain, which only fits when argsz covers it, bytes up to argsz; argsz
// itself changes only to ask for more room for the capabilities.
void check_written_back(unsigned long request, long r, const uint8_t* passed, uint32_t argsz_in) {
  const uint8_t* now = g_arg->buf;
  auto same = [&](size_t from, size_t to) {
    return to <= from || std::memcmp(passed + from, now + from, to - from) == 0;
  };
  if (r < 0) {
    FUZZ_CHECK(same(0, kArgBuf), "failed ioctl %#lx wrote into the caller's struct", request);
    return;
  }
  switch (request) {
    case VFIO_IOMMU_MAP_DMA:
    case VFIO_IOMMU_DIRTY_PAGES:
      FUZZ_CHECK(same(0, kArgBuf), "ioctl %#lx wrote into the caller's struct", request);
      return;
    case VFIO_IOMMU_UNMAP_DMA: {
      const size_t at = offsetof(vfio_iommu_type1_dma_unmap, size);
      FUZZ_CHECK(same(0, at) && same(at + sizeof(__u64), kArgBuf),
                 "UNMAP_DMA wrote outside `size` of the caller's struct");
      return;
    }
    case VFIO_IOMMU_GET_INFO: {
      const auto* info = reinterpret_cast<const vfio_iommu_type1_info*>(now);
      const size_t n = std::min<size_t>(argsz_in, sizeof(*info));
      const bool caps = (info->flags & VFIO_IOMMU_INFO_CAPS) != 0;
      const size_t end = caps && argsz_in >= sizeof(*info) ? argsz_in : n;
      FUZZ_CHECK(same(end, kArgBuf), "GET_INFO with argsz %u wrote past byte %zu", argsz_in, end);
      FUZZ_CHECK(info->argsz == argsz_in || (caps && info->argsz > argsz_in),
                 "GET_INFO changed argsz %u to %u (caps %d)", argsz_in, info->argsz, caps);
      FUZZ_CHECK((info->flags & ~(VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS)) == 0,
                 "GET_INFO flags %#x", info->flags);
      // The tail padding after cap_offset (`pad` in newer headers).
      const size_t pad = offsetof(vfio_iommu_type1_info, cap_offset) + sizeof(__u32);
      static const uint8_t zeros[sizeof(*info)] = {};
      FUZZ_CHECK(n < sizeof(*info) || std::memcmp(now + pad, zeros, sizeof(*info) - pad) == 0,
                 "GET_INFO's padding is not zero-filled");
      return;
    }
    default:
      return;
  }
}

long do_ioctl(iomm_vfio_container* c, Reader& in, int* err) {
  const uint8_t sel = in.u8();
  unsigned long request = 0;
  if (sel < 0xf0) {
    request = kRequests[sel % std::size(kRequests)];
  } else {
    request = in.u32();  // garbage
  }
  std::memset(g_arg->buf, 0, sizeof(g_arg->buf));
  void* arg = g_arg->buf;
  switch (request) {
    case VFIO_CHECK_EXTENSION:
    case VFIO_SET_IOMMU: {
      const uint8_t b = in.u8();
      arg = reinterpret_cast<void*>(b < 0xf0 ? static_cast<unsigned long>(b % 12) : in.u64());
      break;
    }
    case VFIO_IOMMU_GET_INFO: {
      auto* info = reinterpret_cast<vfio_iommu_type1_info*>(g_arg->buf);
      info->argsz = pick_argsz(in, sizeof(*info));
      info->flags = in.u8() == 0xff ? in.u32() : 0;
      break;
    }
    case VFIO_IOMMU_MAP_DMA: {
      auto* map = reinterpret_cast<vfio_iommu_type1_dma_map*>(g_arg->buf);
      map->argsz = pick_argsz(in, sizeof(*map));
      const uint8_t f = in.u8();
      map->flags = f & 7;  // READ | WRITE | VADDR
      if ((f & 0x80) != 0) map->flags |= in.u32();
      map->iova = pick_iova(in);
      map->size = pick_size(in);
      map->vaddr = pick_vaddr(in, map->size);
      break;
    }
    case VFIO_IOMMU_UNMAP_DMA: {
      auto* unmap = reinterpret_cast<vfio_iommu_type1_dma_unmap*>(g_arg->buf);
      const uint8_t f = in.u8();
      unmap->flags = f & 7;  // GET_DIRTY_BITMAP | ALL | VADDR
      if ((f & 0x80) != 0) unmap->flags |= in.u32();
      unmap->iova = pick_iova(in);
      unmap->size = pick_size(in);
      const bool dirty = (unmap->flags & VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP) != 0;
      unmap->argsz = pick_argsz(in, sizeof(*unmap) + (dirty ? sizeof(vfio_bitmap) : 0));
      if (dirty) fill_bitmap(in, reinterpret_cast<vfio_bitmap*>(unmap->data), unmap->size);
      break;
    }
    case VFIO_IOMMU_DIRTY_PAGES: {
      auto* dirty = reinterpret_cast<vfio_iommu_type1_dirty_bitmap*>(g_arg->buf);
      const uint8_t f = in.u8();
      dirty->flags = f % 8;  // START, STOP, GET_BITMAP, or combinations
      if ((f & 0x80) != 0) dirty->flags = in.u32();
      auto* get = reinterpret_cast<vfio_iommu_type1_dirty_bitmap_get*>(dirty->data);
      get->iova = pick_iova(in);
      get->size = pick_size(in);
      fill_bitmap(in, &get->bitmap, get->size);
      dirty->argsz = pick_argsz(in, sizeof(*dirty) + sizeof(*get));
      break;
    }
    default: {
      // Struct bytes straight from the input.
      in.bytes(g_arg->buf, std::min<size_t>(in.u8(), 64));
      const uint8_t b = in.u8();
      if (b == 0xfe) arg = nullptr;
      break;
    }
  }
  if (in.u8() == 0xfd) arg = nullptr;  // sometimes no argument at all
  g_request = request;
  // UNMAP_DMA writes the unmapped bytes over size: keep the request.
  const bool is_unmap = request == VFIO_IOMMU_UNMAP_DMA && arg != nullptr;
  const auto* unmap = static_cast<const vfio_iommu_type1_dma_unmap*>(arg);
  const uint64_t unmap_iova = is_unmap ? unmap->iova : 0;
  const uint64_t unmap_size = is_unmap ? unmap->size : 0;
  // The caller's struct as passed, to compare what the call wrote back.
  static auto* const passed = new Arg;
  std::memcpy(passed->buf, g_arg->buf, sizeof(passed->buf));
  const uint32_t argsz_in = reinterpret_cast<const vfio_iommu_type1_info*>(g_arg->buf)->argsz;
  errno = 0;
  const long r = iomm_vfio_ioctl(c, request, arg);
  *err = errno;
  if (arg == g_arg->buf) check_written_back(request, r, passed->buf, argsz_in);
  if (r >= 0) {
    if (request == VFIO_SET_IOMMU) shadow->iommu_set(reinterpret_cast<unsigned long>(arg));
    if (request == VFIO_IOMMU_MAP_DMA && arg != nullptr) {
      shadow->mapped(*static_cast<const vfio_iommu_type1_dma_map*>(arg));
    }
    if (is_unmap) shadow->unmapped(*unmap, unmap_iova, unmap_size);
    if (request == VFIO_IOMMU_DIRTY_PAGES && arg != nullptr) {
      shadow->dirty_pages_call(*static_cast<const vfio_iommu_type1_dirty_bitmap*>(arg));
    }
    if (request == VFIO_GET_API_VERSION) {
      FUZZ_CHECK(r == VFIO_API_VERSION, "VFIO_GET_API_VERSION returned %ld", r);
    }
    if (request == VFIO_CHECK_EXTENSION) {
      FUZZ_CHECK(r == 0 || r == 1, "VFIO_CHECK_EXTENSION returned %ld", r);
    }
  }
  return r;
}

void recreate_software_group(iomm_vfio_container* c, iomm_vfio_group** g, Reader& in) {
  if (*g != nullptr) {
    iomm_vfio_group_destroy(*g);
    shadow->group_destroyed();
  }
  *g = nullptr;
  const uint8_t b = in.u8();
  iomm_vfio_reserved_range reserved[2] = {{0xfee00000, 0xfeefffff}, {0x200000, 0x3fffff}};
  iomm_vfio_sw_group_config cfg{};
  switch (b % 4) {
    case 1:
      cfg.aperture_start = 0x100000;
      cfg.aperture_last = 0xffffffff;
      break;
    case 2:
      cfg.aperture_start = 0;
      cfg.aperture_last = UINT64_MAX;
      break;
    case 3:
      cfg.aperture_start = 0x2000;
      cfg.aperture_last = 0x1000;  // invalid
      break;
    default:
      break;
  }
  const uint64_t bitmaps[] = {0, 0x1000, 0x201000, 0x10000 | 0x200000, 0x800, 0x200000};
  cfg.pgsize_bitmap = bitmaps[(b / 4) % std::size(bitmaps)];
  cfg.nr_reserved = (b / 24) % 3;
  cfg.reserved = reserved;
  const Snapshot before = snapshot();
  errno = 0;
  *g = iomm_vfio_group_create_software(c, &cfg);
  const int err = errno;
  check_result(*g != nullptr ? 0 : -1, err, before, "iomm_vfio_group_create_software",
               {EINVAL, EBUSY, ENOMEM, EFAULT});
  if (*g != nullptr) shadow->group_created();
}

void recreate_mediated_group(iomm_vfio_container* c, Reader& in) {
  if (med->group != nullptr) {
    iomm_vfio_group_destroy(med->group);
    shadow->group_destroyed();
  }
  {
    std::lock_guard lk(med->mu);
    med->group = nullptr;
    med->pins.clear();  // destroying the group released them
  }
  if ((in.u8() & 1) != 0) return;
  const Snapshot before = snapshot();
  errno = 0;
  iomm_vfio_group* g = iomm_vfio_group_create_mediated(c, on_dma_unmap, med);
  const int err = errno;
  check_result(g != nullptr ? 0 : -1, err, before, "iomm_vfio_group_create_mediated",
               {EINVAL, EBUSY, ENOMEM});
  if (g != nullptr) shadow->group_created();
  std::lock_guard lk(med->mu);
  med->group = g;
}

// vfio_pin_pages / vfio_unpin_pages / vfio_dma_rw on the mediated group, and
// device DMA through the software group.
void group_op(uint8_t which, iomm_vfio_group* sw, Reader& in) {
  static std::vector<uint8_t> data(256 * 1024);
  const Snapshot before = snapshot();
  switch (which % 4) {
    case 0: {  // pin
      const uint64_t iova = pick_iova(in);
      int npage = static_cast<int>(in.u8() % 8) + 1;
      const uint8_t b = in.u8();
      if (b == 0xff) npage = static_cast<int>(in.u32());
      const int prot = b & 3;
      std::vector<void*> host(std::clamp(npage, 1, 4096));
      std::lock_guard lk(med->mu);
      errno = 0;
      const int r = iomm_vfio_pin_pages(med->group, iova, npage, prot,
                                        (b & 0x40) != 0 ? nullptr : host.data());
      const int err = errno;
      check_result(r, err, before, "iomm_vfio_pin_pages",
                   {E2BIG, EINVAL, EACCES, EBUSY, EPERM, ENOMEM, EFAULT});
      if (r >= 0) {
        FUZZ_CHECK(r == npage, "iomm_vfio_pin_pages returned %d for %d pages", r, npage);
        med->add(iova, npage, +1);
      }
      return;
    }
    case 1: {  // unpin pinned pages, or a random range
      std::lock_guard lk(med->mu);
      const uint8_t b = in.u8();
      uint64_t iova = 0;
      int npage = 0;
      if (b < 0x80 && !med->pins.empty()) {
        auto it = med->pins.begin();
        std::advance(it, b % med->pins.size());
        iova = it->first;
        npage = static_cast<int>(in.u8() % 4);  // 0 .. 3 pages from a pinned one
      } else {
        iova = pick_iova(in);
        npage = static_cast<int>(in.u8() % 8);
      }
      const bool held = med->group != nullptr && med->all_pinned(iova, npage);
      errno = 0;
      const int r = iomm_vfio_unpin_pages(med->group, iova, npage);
      const int err = errno;
      check_result(r, err, before, "iomm_vfio_unpin_pages", {EINVAL, E2BIG});
      FUZZ_CHECK((r == npage) == held,
                 "unpin of [%#lx, %d pages] gave %d (errno %s); the driver %s every page", iova,
                 npage, r, iomm::errno_name(err), held ? "holds" : "does not hold");
      if (r > 0) med->add(iova, npage, -1);
      return;
    }
    case 2:
    case 3: {  // rw through the mediated group (2) or device DMA (3)
      const uint64_t iova = pick_iova(in);
      const size_t len = pick_size(in) % (data.size() + 1);
      const int write = in.u8() & 1;
      errno = 0;
      const int r = which % 4 == 2 ? iomm_vfio_dma_rw(med->group, iova, data.data(), len, write)
                                   : iomm_vfio_group_dma_rw(sw, iova, data.data(), len, write);
      const int err = errno;
      // As the header lists them (vfio_dma_rw: EINVAL, EPERM, EBUSY, EFAULT;
      // device DMA: EFAULT, EPERM, EINVAL).
      if (write != 0) shadow->wrote(iova, len, r >= 0);
      if (which % 4 == 2) {
        check_result(r, err, before, "iomm_vfio_dma_rw", {EINVAL, EPERM, EBUSY, EFAULT});
      } else {
        check_result(r, err, before, "iomm_vfio_group_dma_rw", {EFAULT, EPERM, EINVAL});
      }
      return;
    }
  }
}

void check_clean(const char* when) {
  const iomm::Counters c = iomm::counters();
  FUZZ_CHECK(c.pinned_bytes == 0 && c.simulated_pinned_bytes == 0 && c.charged_bytes == 0 &&
                 c.vmlck_bytes == 0,
             "%s: pinned %#lx, simulated %#lx, charged %#lx, VmLck %#lx", when, c.pinned_bytes,
             c.simulated_pinned_bytes, c.charged_bytes, c.vmlck_bytes);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  setup();
  g_arg = new Arg();
  g_bitmap = new uint8_t[kBitmapBuf];
  med = new Mediated();
  if (const char* e = std::getenv("IOMM_FUZZ_TRACE"); e != nullptr && *e == '1') g_trace = true;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (mem == nullptr) LLVMFuzzerInitialize(nullptr, nullptr);
  iomm::fuzz::trace_input_start(g_trace);
  Reader in(data, size);
  iomm::fuzz::g_step_index = -1;
  iomm::fuzz::g_step_name = "setup";
  check_clean("before the input");

  Type1Shadow type1_shadow;
  shadow = &type1_shadow;
  iomm_vfio_container* c = iomm_vfio_open();
  FUZZ_CHECK(c != nullptr, "iomm_vfio_open failed");
  const uint8_t h0 = in.u8();
  if ((h0 & 3) != 0) {
    const uint32_t limits[] = {0, 1, 2, 4};
    const int r = iomm_vfio_set_dma_entry_limit(c, limits[h0 & 3]);
    FUZZ_CHECK(r == 0 || (r == -1 && errno == EINVAL && (h0 & 3) == 0),
               "iomm_vfio_set_dma_entry_limit gave %d errno %d", r, errno);
  }
  iomm_vfio_group* sw = nullptr;
  recreate_software_group(c, &sw, in);
  recreate_mediated_group(c, in);
  if (const uint8_t h3 = in.u8(); (h3 & 1) != 0) {
    const unsigned long types[] = {VFIO_TYPE1v2_IOMMU, VFIO_TYPE1_IOMMU};
    errno = 0;
    const long r =
        iomm_vfio_ioctl(c, VFIO_SET_IOMMU, reinterpret_cast<void*>(types[(h3 >> 1) & 1]));
    check_result(r, errno, snapshot(), "VFIO_SET_IOMMU", {TYPE1_ERRNOS});
    if (r == 0) shadow->iommu_set(types[(h3 >> 1) & 1]);
  }

  for (size_t step = 0; step < kMaxSteps && !in.empty(); ++step) {
    iomm::fuzz::g_step_index = static_cast<int>(step);
    const uint8_t op = in.u8();
    switch (op % 8) {
      case 0:
      case 1:
      case 2:
      case 3: {
        iomm::fuzz::g_step_name = "ioctl";
        const Snapshot before = snapshot();
        int err = 0;
        const long r = do_ioctl(c, in, &err);
        check_result(r, err, before, "iomm_vfio_ioctl", {TYPE1_ERRNOS});
        break;
      }
      case 4:
      case 5:
        iomm::fuzz::g_step_name = "group";
        group_op(in.u8(), sw, in);
        break;
      case 6:
        iomm::fuzz::g_step_name = "software group";
        recreate_software_group(c, &sw, in);
        break;
      case 7:
        iomm::fuzz::g_step_name = "mediated group";
        recreate_mediated_group(c, in);
        break;
    }
  }

  iomm::fuzz::g_step_name = "teardown";
  // Odd sizes: groups first, then the container. Even sizes: close the
  // container with its groups in it (it detaches them and releases the
  // IOMMU), then destroy the group handles, which outlive it as a kernel
  // group fd outlives its container. (The header says close "destroys" the
  // groups; the implementation only detaches them, so they are freed here.)
  const bool groups_first = (size & 1) != 0;
  if (groups_first) {
    iomm_vfio_group_destroy(med->group);
    iomm_vfio_group_destroy(sw);
  }
  FUZZ_CHECK(iomm_vfio_close(c) == 0, "iomm_vfio_close failed");
  check_clean("after close");
  if (!groups_first) {
    iomm_vfio_group_destroy(med->group);
    iomm_vfio_group_destroy(sw);
  }
  {
    std::lock_guard lk(med->mu);
    med->group = nullptr;
    med->pins.clear();
  }
  check_clean("after the groups are destroyed");
  return 0;
}
