// Differential conformance, inside a guest: seeded random sequences of type1
// container calls go to the kernel's container (/dev/vfio/vfio with a real
// group) and to iomm's type1 layer (iomm_vfio_ioctl with a software group
// configured like the kernel's: aperture, reserved MSI window, page sizes).
// Every return value, errno and byte of the caller's struct after the call
// (on failure too) must match. A difference is reported with its seed and
// the shortest sequence found that still shows it (delta minimization).
//
// Differences iomm keeps on purpose are excluded here, each named in
// docs/kernel-differences.md:
// - dirty bitmap contents: the kernel (no pinned-page dirty scope) reports
//   every mapped page dirty; iomm reports the pages written (none here). The
//   check is that iomm's bits are a subset of the kernel's.
// - GET_INFO capability layout: iomm follows Linux 6.6+ (each capability
//   padded to 8 bytes). A kernel with the older packed layout (Debian's 6.1)
//   needs fewer bytes for the same chain, so against it GET_INFO is
//   compared by meaning: the same errno, flags, page sizes and
//   capabilities (id, version, contents, in order), and each side's argsz
//   and cap_offset as its own layout requires.
// - CHECK_EXTENSION(VFIO_TYPE1_NESTING_IOMMU): kernels before 6.13 report 1
//   (the nesting type was an alias of v2 that no IOMMU driver here
//   implements; 6.13 removed it); iomm reports 0, as current kernels do.
#include <fcntl.h>
#include <linux/vfio.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "guest_report.hpp"
#include "iomm/kernel_vfio.hpp"
#include "iomm/vfio_compat.h"

namespace iomm::guest {

namespace {

constexpr size_t kBufferPages = 64;
constexpr size_t kPage = 4096;
constexpr size_t kBitmapBytes = 1 << 16;
constexpr size_t kArgBytes = 512;
constexpr int kStepsPerSequence = 40;

enum class Kind : uint8_t { map, unmap, get_info, dirty, check_extension };

struct Op {
  Kind kind;
  uint32_t argsz;
  uint32_t flags;
  uint64_t iova;
  uint64_t size;
  uint64_t vaddr;       // offset from the buffer, or absolute
  bool vaddr_absolute;  // (a wrapping or foreign address)
  uint64_t bm_pgsize;   // dirty bitmap (UNMAP with GET_DIRTY_BITMAP, GET_BITMAP)
  uint64_t bm_size;
};

// What one side did with one call.
struct Outcome {
  Kind kind = Kind::map;
  uint32_t argsz_in = 0;
  uint64_t extension = 0;  // CHECK_EXTENSION's argument
  long rc = 0;
  int err = 0;
  std::vector<uint8_t> arg;
  std::vector<uint8_t> bitmap;
};

// One side: a fresh container per sequence.
class Side {
 public:
  virtual ~Side() = default;
  virtual bool open(bool v1) = 0;
  virtual void close() = 0;
  virtual long call(unsigned long request, void* arg) = 0;
};

class KernelSide : public Side {
 public:
  explicit KernelSide(int group) : group_(group) {}
  bool open(bool v1) override {
    container_ = ::open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
    if (container_ < 0) return false;
    if (::ioctl(group_, VFIO_GROUP_SET_CONTAINER, &container_) != 0) return false;
    return ::ioctl(container_, VFIO_SET_IOMMU, v1 ? VFIO_TYPE1_IOMMU : VFIO_TYPE1v2_IOMMU) == 0;
  }
  void close() override {
    ::ioctl(group_, VFIO_GROUP_UNSET_CONTAINER);
    ::close(container_);
    container_ = -1;
  }
  long call(unsigned long request, void* arg) override { return ::ioctl(container_, request, arg); }

 private:
  int group_;
  int container_ = -1;
};

class IommSide : public Side {
 public:
  explicit IommSide(const iomm_vfio_sw_group_config& cfg) : cfg_(cfg) {}
  bool open(bool v1) override {
    c_ = iomm_vfio_open();
    if (c_ == nullptr) return false;
    g_ = iomm_vfio_group_create_software(c_, &cfg_);
    if (g_ == nullptr) return false;
    const unsigned long type = v1 ? VFIO_TYPE1_IOMMU : VFIO_TYPE1v2_IOMMU;
    return iomm_vfio_ioctl(c_, VFIO_SET_IOMMU, reinterpret_cast<void*>(type)) == 0;
  }
  void close() override {
    if (g_ != nullptr) iomm_vfio_group_destroy(g_);
    if (c_ != nullptr) iomm_vfio_close(c_);
    g_ = nullptr;
    c_ = nullptr;
  }
  long call(unsigned long request, void* arg) override { return iomm_vfio_ioctl(c_, request, arg); }

 private:
  iomm_vfio_sw_group_config cfg_;
  iomm_vfio_container* c_ = nullptr;
  iomm_vfio_group* g_ = nullptr;
};

// Values that find the edges: near the buffer's IOVA window, page and
// sub-page offsets, the MSI window, the aperture's end, the top of the space.
class Gen {
 public:
  explicit Gen(uint64_t seed) : rng_(seed) {}

  uint64_t pick(uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(rng_); }

  uint64_t iova() {
    switch (pick(12)) {
      case 0:
        return 0;
      case 1:
        return 0xfee00000ULL + kPage * pick(4) - (pick(2) != 0 ? kPage : 0);
      case 2:
        return (1ULL << 39) - kPage * (1 + pick(4));
      case 3:
        return UINT64_MAX - kPage * pick(3) - (pick(2) != 0 ? 0 : 0xfff);
      case 4:
        return 0x100000 + kPage * pick(16) + 1 + pick(0xffe);
      case 5:
        return 1ULL << 39;
      default:
        return 0x100000 + kPage * pick(24);
    }
  }
  uint64_t size() {
    switch (pick(12)) {
      case 0:
        return 0;
      case 1:
        return kPage * (1 + pick(4)) + 1 + pick(0xffe);
      case 2:
        return UINT64_MAX - pick(2) * 0xfff;
      case 3:
        return kPage * (32 + pick(64));
      case 4:
        return 1ULL << 39;
      default:
        return kPage * (1 + pick(8));
    }
  }
  uint32_t argsz(uint32_t exact) {
    switch (pick(16)) {
      case 0:
        return exact - 1 - static_cast<uint32_t>(pick(exact));
      case 1:
        return exact + 1 + static_cast<uint32_t>(pick(64));
      case 2:
        return 0;
      default:
        return exact;
    }
  }

  Op next() {
    Op op{};
    switch (pick(20)) {
      case 0:
      case 1:
      case 2:
      case 3:
      case 4:
      case 5:
      case 6:
      case 7: {
        op.kind = Kind::map;
        op.argsz = argsz(sizeof(vfio_iommu_type1_dma_map));
        const uint32_t prot[] = {3, 3, 3, 1, 2, 0, VFIO_DMA_MAP_FLAG_VADDR, 3 | 8, 1u << 31};
        op.flags = prot[pick(std::size(prot))];
        op.iova = iova();
        op.size = pick(3) != 0 ? kPage * (1 + pick(8)) : size();
        if (pick(10) == 0) {
          op.vaddr_absolute = true;
          op.vaddr = pick(2) != 0 ? UINT64_MAX - 0xfff : 0x1000;
        } else {
          op.vaddr = kPage * pick(kBufferPages) + (pick(12) == 0 ? 0x800 : 0);
        }
        break;
      }
      case 8:
      case 9:
      case 10:
      case 11:
      case 12:
      case 13: {
        op.kind = Kind::unmap;
        const uint32_t flags[] = {0,
                                  0,
                                  0,
                                  0,
                                  VFIO_DMA_UNMAP_FLAG_ALL,
                                  VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
                                  VFIO_DMA_UNMAP_FLAG_VADDR,
                                  VFIO_DMA_UNMAP_FLAG_ALL | VFIO_DMA_UNMAP_FLAG_VADDR,
                                  1u << 7};
        op.flags = flags[pick(std::size(flags))];
        const uint32_t exact = sizeof(vfio_iommu_type1_dma_unmap) +
                               ((op.flags & VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP) != 0
                                    ? static_cast<uint32_t>(sizeof(vfio_bitmap))
                                    : 0U);
        op.argsz = argsz(exact);
        if ((op.flags & VFIO_DMA_UNMAP_FLAG_ALL) != 0 && pick(3) != 0) {
          op.iova = 0;
          op.size = 0;
        } else {
          op.iova = iova();
          op.size = size();
        }
        bitmap(op);
        break;
      }
      case 14:
      case 15: {
        op.kind = Kind::get_info;
        const uint32_t sizes[] = {0,   8,   16,  17,  20,  23,  24,  32,        64,
                                  100, 104, 112, 116, 120, 128, 256, kArgBytes, kArgBytes};
        op.argsz = sizes[pick(std::size(sizes))];
        break;
      }
      case 16:
      case 17:
      case 18: {
        op.kind = Kind::dirty;
        const uint32_t flags[] = {
            VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
            VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
            VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP,
            VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
            VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
            VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
            0,
            VFIO_IOMMU_DIRTY_PAGES_FLAG_START | VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP,
            1u << 5};
        op.flags = flags[pick(std::size(flags))];
        const uint32_t exact =
            sizeof(vfio_iommu_type1_dirty_bitmap) +
            ((op.flags & VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP) != 0
                 ? static_cast<uint32_t>(sizeof(vfio_iommu_type1_dirty_bitmap_get))
                 : 0U);
        op.argsz = argsz(exact);
        op.iova = pick(2) != 0 ? 0x100000 + kPage * pick(24) : iova();
        op.size = pick(2) != 0 ? kPage * (1 + pick(16)) : size();
        bitmap(op);
        break;
      }
      default:
        op.kind = Kind::check_extension;
        op.iova = pick(12);
        break;
    }
    return op;
  }

 private:
  void bitmap(Op& op) {
    op.bm_pgsize = pick(8) != 0 ? kPage : (pick(2) != 0 ? 2 * kPage : 512);
    const uint64_t pages = op.size / kPage;
    const uint64_t need = ((pages + 63) / 64) * 8;
    switch (pick(8)) {
      case 0:
        op.bm_size = 0;
        break;
      case 1:
        op.bm_size = need > 8 ? need - 8 : 0;
        break;
      default:
        op.bm_size = std::min<uint64_t>(std::max<uint64_t>(need, 8), kBitmapBytes);
    }
  }

  std::mt19937_64 rng_;
};

std::string hex(uint64_t v) {
  char b[24];
  std::snprintf(b, sizeof(b), "0x%llx", static_cast<unsigned long long>(v));
  return b;
}

std::string describe(const Op& op) {
  std::string s;
  switch (op.kind) {
    case Kind::map:
      s = "MAP_DMA";
      break;
    case Kind::unmap:
      s = "UNMAP_DMA";
      break;
    case Kind::get_info:
      return "GET_INFO argsz=" + std::to_string(op.argsz);
    case Kind::dirty:
      s = "DIRTY_PAGES";
      break;
    case Kind::check_extension:
      return "CHECK_EXTENSION " + std::to_string(op.iova);
  }
  s += " argsz=" + std::to_string(op.argsz) + " flags=" + hex(op.flags) + " iova=" + hex(op.iova) +
       " size=" + hex(op.size);
  if (op.kind == Kind::map) {
    s += op.vaddr_absolute ? " vaddr=" + hex(op.vaddr) : " vaddr=buf+" + hex(op.vaddr);
  } else {
    s += " bitmap.pgsize=" + hex(op.bm_pgsize) + " bitmap.size=" + hex(op.bm_size);
  }
  return s;
}

class Runner {
 public:
  Runner(KernelSide& kernel, IommSide& iomm, uint8_t* buffer, uint8_t* bitmap)
      : kernel_(kernel), iomm_(iomm), buffer_(buffer), bitmap_(bitmap) {}

  // Index of the first op whose outcomes differ, and why; nullopt if none.
  // Kernel outcomes per kind of call (map, unmap, get_info, dirty,
  // check_extension), to show what the sequences reached.
  uint64_t succeeded[5] = {};
  uint64_t failed[5] = {};

  struct Difference {
    size_t index;
    std::string what;
  };
  std::optional<Difference> run(const std::vector<Op>& ops, bool v1, std::string* setup_error) {
    if (!kernel_.open(v1) || !iomm_.open(v1)) {
      *setup_error = std::string("opening the containers failed: ") + std::strerror(errno);
      kernel_.close();
      iomm_.close();
      return std::nullopt;
    }
    std::optional<Difference> diff;
    for (size_t i = 0; i < ops.size() && !diff; ++i) {
      const Outcome k = apply(kernel_, ops[i]);
      const Outcome m = apply(iomm_, ops[i]);
      ++(k.rc >= 0 ? succeeded : failed)[static_cast<size_t>(ops[i].kind)];
      if (auto what = compare(k, m)) diff = Difference{i, *what};
    }
    kernel_.close();
    iomm_.close();
    return diff;
  }

 private:
  Outcome apply(Side& side, const Op& op) {
    std::vector<uint8_t> arg(kArgBytes, 0xa5);
    std::memset(bitmap_, 0, kBitmapBytes);
    unsigned long request = 0;
    void* argp = arg.data();
    switch (op.kind) {
      case Kind::map: {
        vfio_iommu_type1_dma_map m{};
        m.argsz = op.argsz;
        m.flags = op.flags;
        m.vaddr = op.vaddr_absolute ? op.vaddr : reinterpret_cast<uintptr_t>(buffer_) + op.vaddr;
        m.iova = op.iova;
        m.size = op.size;
        std::memcpy(arg.data(), &m, sizeof(m));
        request = VFIO_IOMMU_MAP_DMA;
        break;
      }
      case Kind::unmap: {
        vfio_iommu_type1_dma_unmap u{};
        u.argsz = op.argsz;
        u.flags = op.flags;
        u.iova = op.iova;
        u.size = op.size;
        vfio_bitmap b{};
        b.pgsize = op.bm_pgsize;
        b.size = op.bm_size;
        b.data = reinterpret_cast<__u64*>(bitmap_);
        std::memcpy(arg.data(), &u, sizeof(u));
        std::memcpy(arg.data() + sizeof(u), &b, sizeof(b));
        request = VFIO_IOMMU_UNMAP_DMA;
        break;
      }
      case Kind::get_info: {
        std::memset(arg.data(), 0, arg.size());
        std::memcpy(arg.data(), &op.argsz, sizeof(op.argsz));
        request = VFIO_IOMMU_GET_INFO;
        break;
      }
      case Kind::dirty: {
        vfio_iommu_type1_dirty_bitmap d{};
        d.argsz = op.argsz;
        d.flags = op.flags;
        vfio_iommu_type1_dirty_bitmap_get g{};
        g.iova = op.iova;
        g.size = op.size;
        g.bitmap.pgsize = op.bm_pgsize;
        g.bitmap.size = op.bm_size;
        g.bitmap.data = reinterpret_cast<__u64*>(bitmap_);
        std::memcpy(arg.data(), &d, sizeof(d));
        std::memcpy(arg.data() + sizeof(d), &g, sizeof(g));
        request = VFIO_IOMMU_DIRTY_PAGES;
        break;
      }
      case Kind::check_extension:
        request = VFIO_CHECK_EXTENSION;
        argp = reinterpret_cast<void*>(static_cast<uintptr_t>(op.iova));
        break;
    }
    Outcome out;
    out.kind = op.kind;
    out.argsz_in = op.argsz;
    out.extension = op.iova;
    errno = 0;
    out.rc = side.call(request, argp);
    out.err = out.rc < 0 ? errno : 0;
    out.arg = std::move(arg);
    out.bitmap.assign(bitmap_, bitmap_ + kBitmapBytes);
    return out;
  }

  std::optional<std::string> compare(const Outcome& k, const Outcome& m) const {
    if (k.kind == Kind::check_extension && k.extension == VFIO_TYPE1_NESTING_IOMMU) {
      return std::nullopt;  // excluded, see the top of this file
    }
    if (k.rc != m.rc || k.err != m.err) {
      return "kernel returned " + std::to_string(k.rc) + " errno " + errno_name(k.err) + ", iomm " +
             std::to_string(m.rc) + " errno " + errno_name(m.err);
    }
    if (k.kind == Kind::get_info && k.rc == 0 && layouts_differ_) return compare_info(k, m);
    for (size_t i = 0; i < k.arg.size(); ++i) {
      if (k.arg[i] != m.arg[i]) {
        std::string s = "the caller's struct differs from byte " + std::to_string(i) + ":";
        for (size_t j = i; j < std::min(k.arg.size(), i + 16); ++j) {
          char b[16];
          std::snprintf(b, sizeof(b), " %02x/%02x", k.arg[j], m.arg[j]);
          s += b;
        }
        return s + " (kernel/iomm)";
      }
    }
    for (size_t i = 0; i < k.bitmap.size(); ++i) {
      if ((m.bitmap[i] & ~k.bitmap[i]) != 0) {
        return "iomm's dirty bitmap has bits the kernel's has not, at byte " + std::to_string(i);
      }
    }
    return std::nullopt;
  }

  // GET_INFO across capability layouts (see the top of this file).
  std::optional<std::string> compare_info(const Outcome& k, const Outcome& m) const {
    vfio_iommu_type1_info ki{};
    vfio_iommu_type1_info mi{};
    std::memcpy(&ki, k.arg.data(), sizeof(ki));
    std::memcpy(&mi, m.arg.data(), sizeof(mi));
    if (ki.flags != mi.flags || ki.iova_pgsizes != mi.iova_pgsizes) {
      return "GET_INFO flags or iova_pgsizes differ";
    }
    // Below sizeof(info) a 6.1 kernel copies back 16 bytes, 6.6+ and iomm
    // min(argsz, 24): cap_offset is only there from 24 bytes on.
    const uint32_t in = k.argsz_in;
    const auto own_rule = [&](const vfio_iommu_type1_info& i, uint32_t need,
                              const char* who) -> std::optional<std::string> {
      const bool fits = in >= need;
      if (i.argsz != (fits ? in : need) ||
          (in >= sizeof(vfio_iommu_type1_info) && (i.cap_offset != 0) != fits)) {
        return std::string(who) + "'s GET_INFO argsz " + std::to_string(i.argsz) + " cap_offset " +
               std::to_string(i.cap_offset) + " for argsz " + std::to_string(in) + " (needs " +
               std::to_string(need) + ")";
      }
      return std::nullopt;
    };
    if (auto e = own_rule(ki, kernel_need_, "the kernel")) return e;
    if (auto e = own_rule(mi, iomm_need_, "iomm")) return e;
    if (ki.cap_offset != 0 && mi.cap_offset != 0 &&
        caps(k.arg, ki.cap_offset) != caps(m.arg, mi.cap_offset)) {
      return "GET_INFO capabilities differ: kernel " + caps(k.arg, ki.cap_offset) + ", iomm " +
             caps(m.arg, mi.cap_offset);
    }
    return std::nullopt;
  }

  // The chain by meaning: id, version and contents of each capability.
  static std::string caps(const std::vector<uint8_t>& buf, uint32_t off) {
    std::string out;
    for (int n = 0; off != 0 && n < 16 && off + sizeof(vfio_info_cap_header) <= buf.size(); ++n) {
      vfio_info_cap_header h;
      std::memcpy(&h, buf.data() + off, sizeof(h));
      out += "[id " + std::to_string(h.id) + " v" + std::to_string(h.version);
      if (h.id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE &&
          off + sizeof(vfio_iommu_type1_info_cap_iova_range) <= buf.size()) {
        vfio_iommu_type1_info_cap_iova_range r;
        std::memcpy(&r, buf.data() + off, sizeof(r));
        for (uint32_t i = 0; i < r.nr_iovas && i < 8; ++i) {
          vfio_iova_range v;
          const size_t at = off + sizeof(r) + i * sizeof(v);
          if (at + sizeof(v) > buf.size()) break;
          std::memcpy(&v, buf.data() + at, sizeof(v));
          out += " " + hex(v.start) + "-" + hex(v.end);
        }
      } else if (h.id == VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL &&
                 off + sizeof(vfio_iommu_type1_info_dma_avail) <= buf.size()) {
        vfio_iommu_type1_info_dma_avail a;
        std::memcpy(&a, buf.data() + off, sizeof(a));
        out += " avail " + std::to_string(a.avail);
      } else if (h.id == VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION &&
                 off + sizeof(vfio_iommu_type1_info_cap_migration) <= buf.size()) {
        vfio_iommu_type1_info_cap_migration mg;
        std::memcpy(&mg, buf.data() + off, sizeof(mg));
        out += " flags " + hex(mg.flags) + " pgsizes " + hex(mg.pgsize_bitmap) + " max " +
               hex(mg.max_dirty_bitmap_size);
      }
      out += "]";
      if (h.next <= off) break;
      off = h.next;
    }
    return out;
  }

 public:
  // Learn both sides' GET_INFO sizes (read-only calls on a fresh pair of
  // containers): whether the layouts differ and what each needs.
  void learn_layouts() {
    vfio_iommu_type1_info k{};
    k.argsz = sizeof(k);
    vfio_iommu_type1_info m = k;
    kernel_.open(false);
    iomm_.open(false);
    kernel_.call(VFIO_IOMMU_GET_INFO, &k);
    iomm_.call(VFIO_IOMMU_GET_INFO, &m);
    kernel_.close();
    iomm_.close();
    kernel_need_ = k.argsz;
    iomm_need_ = m.argsz;
    layouts_differ_ = kernel_need_ != iomm_need_;
    std::printf("GET_INFO needs %u bytes from the kernel, %u from iomm%s\n", kernel_need_,
                iomm_need_, layouts_differ_ ? ": compared by meaning" : "");
  }

 private:
  bool layouts_differ_ = false;
  uint32_t kernel_need_ = 0;
  uint32_t iomm_need_ = 0;

  static std::string errno_name(int e) {
    return e == 0 ? "0" : std::to_string(e) + " (" + std::strerror(e) + ")";
  }

  KernelSide& kernel_;
  IommSide& iomm_;
  uint8_t* buffer_;
  uint8_t* bitmap_;
};

// Shortest sub-sequence (removing chunks, halving their size) that still
// differs; ends at the op that differs.
std::vector<Op> minimize(Runner& r, std::vector<Op> seq, bool v1) {
  std::string ignored;
  for (size_t chunk = std::max<size_t>(seq.size() / 2, 1);; chunk /= 2) {
    for (size_t i = 0; i < seq.size();) {
      std::vector<Op> candidate(seq.begin(), seq.begin() + static_cast<ptrdiff_t>(i));
      candidate.insert(candidate.end(),
                       seq.begin() + static_cast<ptrdiff_t>(std::min(i + chunk, seq.size())),
                       seq.end());
      auto d = candidate.empty() ? std::nullopt : r.run(candidate, v1, &ignored);
      if (d) {
        candidate.resize(d->index + 1);
        seq = std::move(candidate);
      } else {
        i += chunk;
      }
    }
    if (chunk == 1) break;
  }
  return seq;
}

}  // namespace

int conformance_main(int group_number, uint64_t first_seed, uint64_t seeds) {
  auto kernel_info = [&]() -> Result<KernelIommuInfo> {
    auto d = KernelVfioDomain::open(group_number);
    if (!d) return d.error();
    return (*d)->info();
  }();
  if (!kernel_info) {
    fail("conformance.setup", kernel_info.error().describe());
    return 1;
  }
  // The software group mirrors the kernel's: its aperture spans the
  // kernel's ranges, whose holes are reserved regions.
  const auto& ranges = kernel_info->iova_ranges;
  if (ranges.empty()) {
    fail("conformance.setup", "the kernel reports no IOVA range");
    return 1;
  }
  std::vector<iomm_vfio_reserved_range> holes;
  for (size_t i = 1; i < ranges.size(); ++i) {
    holes.push_back({ranges[i - 1].last + 1, ranges[i].start - 1});
  }
  iomm_vfio_sw_group_config cfg{};
  cfg.aperture_start = ranges.front().start;
  cfg.aperture_last = ranges.back().last;
  cfg.pgsize_bitmap = kernel_info->page_sizes;
  cfg.reserved = holes.data();
  cfg.nr_reserved = static_cast<uint32_t>(holes.size());

  const int group = ::open(("/dev/vfio/" + std::to_string(group_number)).c_str(), O_RDWR);
  auto* buffer = static_cast<uint8_t*>(::mmap(nullptr, kBufferPages * kPage, PROT_READ | PROT_WRITE,
                                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0));
  auto* bitmap = static_cast<uint8_t*>(
      ::mmap(nullptr, kBitmapBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (group < 0 || buffer == MAP_FAILED || bitmap == MAP_FAILED) {
    fail("conformance.setup", std::strerror(errno));
    return 1;
  }
  KernelSide kernel(group);
  IommSide iomm(cfg);
  Runner runner(kernel, iomm, buffer, bitmap);
  runner.learn_layouts();

  int reported = 0;
  uint64_t differing = 0;
  uint64_t calls = 0;
  for (uint64_t seed = first_seed; seed < first_seed + seeds; ++seed) {
    Gen gen(seed);
    const bool v1 = gen.pick(4) == 0;
    std::vector<Op> ops;
    for (int i = 0; i < kStepsPerSequence; ++i) ops.push_back(gen.next());
    std::string setup_error;
    auto d = runner.run(ops, v1, &setup_error);
    if (!setup_error.empty()) {
      fail("conformance.setup", "seed " + std::to_string(seed) + ": " + setup_error);
      return 1;
    }
    calls += d ? d->index + 1 : ops.size();
    if (!d) continue;
    ++differing;
    if (reported >= 5) continue;  // the first few, minimized, are enough
    ++reported;
    const std::vector<Op> shortest =
        minimize(runner, {ops.begin(), ops.begin() + static_cast<ptrdiff_t>(d->index + 1)}, v1);
    const auto again = runner.run(shortest, v1, &setup_error);
    std::printf("difference, seed %llu (%s), %zu calls:\n", static_cast<unsigned long long>(seed),
                v1 ? "TYPE1" : "TYPE1v2", shortest.size());
    for (size_t i = 0; i < shortest.size(); ++i) {
      std::printf("  %zu: %s\n", i, describe(shortest[i]).c_str());
    }
    const std::string what = again ? again->what : d->what;
    std::printf("  -> %s\n", what.c_str());
    fail("conformance.seed_" + std::to_string(seed),
         std::string(v1 ? "TYPE1 " : "TYPE1v2 ") + describe(shortest.back()) + ": " + what);
  }
  std::printf("conformance: %llu sequences from seed %llu, %llu calls, %llu differing\n",
              static_cast<unsigned long long>(seeds), static_cast<unsigned long long>(first_seed),
              static_cast<unsigned long long>(calls), static_cast<unsigned long long>(differing));
  const char* names[] = {"MAP_DMA", "UNMAP_DMA", "GET_INFO", "DIRTY_PAGES", "CHECK_EXTENSION"};
  for (size_t i = 0; i < std::size(names); ++i) {
    std::printf("  %s: %llu succeeded, %llu failed\n", names[i],
                static_cast<unsigned long long>(runner.succeeded[i]),
                static_cast<unsigned long long>(runner.failed[i]));
  }
  if (differing == 0) pass("conformance.sequences");
  ::close(group);
  return differing == 0 ? 0 : 1;
}

}  // namespace iomm::guest
