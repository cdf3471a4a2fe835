// The kernel's VFIO type1 container as an external IOAS domain (see
// include/iomm/kernel_vfio.hpp).
#include "iomm/kernel_vfio.hpp"

#include <fcntl.h>
#include <linux/vfio.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <new>
#include <string>

#include "core/check.hpp"
#include "iomm/domain.hpp"

namespace iomm {

namespace {

Error kernel_error(int code, const std::string& call) {
  return Error(code, call + ": " + std::strerror(code));
}

Result<int> open_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return kernel_error(errno, "open " + path);
  return fd;
}

// The capability chain of a GET_INFO reply: each header lies inside the
// reply and the chain moves forward, so a malformed reply cannot loop.
void parse_caps(const std::vector<uint8_t>& buf, uint32_t first, KernelIommuInfo& out) {
  uint32_t off = first;
  while (off != 0 && off >= sizeof(vfio_iommu_type1_info) &&
         off + sizeof(vfio_info_cap_header) <= buf.size()) {
    vfio_info_cap_header h;
    std::memcpy(&h, buf.data() + off, sizeof(h));
    if (h.id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE &&
        off + sizeof(vfio_iommu_type1_info_cap_iova_range) <= buf.size()) {
      vfio_iommu_type1_info_cap_iova_range r;
      std::memcpy(&r, buf.data() + off, sizeof(r));
      const size_t base = off + sizeof(r);
      for (uint32_t i = 0; i < r.nr_iovas; ++i) {
        const size_t at = base + i * sizeof(vfio_iova_range);
        if (at + sizeof(vfio_iova_range) > buf.size()) break;
        vfio_iova_range range;
        std::memcpy(&range, buf.data() + at, sizeof(range));
        out.iova_ranges.push_back({range.start, range.end});
      }
    } else if (h.id == VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL &&
               off + sizeof(vfio_iommu_type1_info_dma_avail) <= buf.size()) {
      vfio_iommu_type1_info_dma_avail a;
      std::memcpy(&a, buf.data() + off, sizeof(a));
      out.has_dma_avail = true;
      out.dma_avail = a.avail;
    }
    if (h.next <= off) break;
    off = h.next;
  }
}

}  // namespace

KernelVfioDomain::KernelVfioDomain(int container, int group, int group_number) noexcept
    : container_(container), group_(group), group_number_(group_number) {}

KernelVfioDomain::~KernelVfioDomain() {
  ::close(group_);
  ::close(container_);
}

Result<std::shared_ptr<KernelVfioDomain>> KernelVfioDomain::open(int group,
                                                                 const std::string& dev_dir) {
  if (group < 0) return Error(EINVAL, "group number " + std::to_string(group) + " is negative");
  auto container = open_path(dev_dir + "/vfio");
  if (!container) return container.error();
  const int cfd = *container;
  auto fail = [&](Error e, int gfd) {
    if (gfd >= 0) ::close(gfd);
    ::close(cfd);
    return e;
  };
  if (const int v = ::ioctl(cfd, VFIO_GET_API_VERSION); v != VFIO_API_VERSION) {
    return fail(Error(EINVAL, "VFIO API version " + std::to_string(v) + ", not " +
                                  std::to_string(VFIO_API_VERSION)),
                -1);
  }
  if (::ioctl(cfd, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) != 1) {
    return fail(Error(ENODEV, "the kernel's VFIO has no type1v2 IOMMU"), -1);
  }
  auto gfd = open_path(dev_dir + "/" + std::to_string(group));
  if (!gfd) return fail(gfd.error(), -1);
  vfio_group_status status{};
  status.argsz = sizeof(status);
  if (::ioctl(*gfd, VFIO_GROUP_GET_STATUS, &status) != 0) {
    return fail(kernel_error(errno, "VFIO_GROUP_GET_STATUS"), *gfd);
  }
  if ((status.flags & VFIO_GROUP_FLAGS_VIABLE) == 0) {
    return fail(Error(EINVAL, "VFIO group " + std::to_string(group) +
                                  " is not viable (a device is bound to a host driver)"),
                *gfd);
  }
  int container_arg = cfd;
  if (::ioctl(*gfd, VFIO_GROUP_SET_CONTAINER, &container_arg) != 0) {
    return fail(kernel_error(errno, "VFIO_GROUP_SET_CONTAINER"), *gfd);
  }
  if (::ioctl(cfd, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU) != 0) {
    return fail(kernel_error(errno, "VFIO_SET_IOMMU"), *gfd);
  }
  auto* d = new (std::nothrow) KernelVfioDomain(cfd, *gfd, group);
  if (d == nullptr) return fail(Error(ENOMEM, "out of memory"), *gfd);
  try {
    return std::shared_ptr<KernelVfioDomain>(d);
  } catch (const std::bad_alloc&) {
    delete d;  // closes both fds
    return Error(ENOMEM, "out of memory");
  }
}

Result<KernelIommuInfo> KernelVfioDomain::info() const {
  try {
    std::vector<uint8_t> buf(sizeof(vfio_iommu_type1_info));
    // Twice at most: the first reply says how much the chain needs.
    for (int round = 0; round < 2; ++round) {
      vfio_iommu_type1_info head{};
      head.argsz = static_cast<uint32_t>(buf.size());
      std::memset(buf.data(), 0, buf.size());
      std::memcpy(buf.data(), &head, sizeof(head));
      if (::ioctl(container_, VFIO_IOMMU_GET_INFO, buf.data()) != 0) {
        return kernel_error(errno, "VFIO_IOMMU_GET_INFO");
      }
      std::memcpy(&head, buf.data(), sizeof(head));
      if (head.argsz > buf.size() && round == 0) {
        buf.resize(head.argsz);
        continue;
      }
      KernelIommuInfo out;
      if ((head.flags & VFIO_IOMMU_INFO_PGSIZES) != 0) out.page_sizes = head.iova_pgsizes;
      if ((head.flags & VFIO_IOMMU_INFO_CAPS) != 0) parse_caps(buf, head.cap_offset, out);
      return out;
    }
    return Error(EIO, "VFIO_IOMMU_GET_INFO: the capability chain kept growing");
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory");
  }
}

Result<int> KernelVfioDomain::device_fd(const std::string& name) const {
  const int fd = ::ioctl(group_, VFIO_GROUP_GET_DEVICE_FD, name.c_str());
  if (fd < 0) return kernel_error(errno, "VFIO_GROUP_GET_DEVICE_FD " + name);
  return fd;
}

KernelVfioCounters KernelVfioDomain::counters() const noexcept {
  return {mappings_.load(std::memory_order_relaxed), mapped_bytes_.load(std::memory_order_relaxed)};
}

Result<ExternalGeometry> KernelVfioDomain::geometry() {
  auto i = info();
  if (!i) return i.error();
  if (i->page_sizes == 0) return Error(EINVAL, "the kernel reports no IOMMU page size");
  ExternalGeometry g;
  // The kernel lists no range for a container without an IOMMU-backed
  // domain: then every IOVA is accepted.
  g.usable = i->iova_ranges.empty() ? std::vector<IovaRange>{{0, UINT64_MAX}} : i->iova_ranges;
  g.min_page_size = i->page_sizes & (~i->page_sizes + 1);
  return g;
}

Status KernelVfioDomain::map(uint64_t iova, void* host, uint64_t length, uint32_t prot) {
  if (host == nullptr)
    return Error(EINVAL, "memory without a host address cannot be mapped by the kernel");
  vfio_iommu_type1_dma_map m{};
  m.argsz = sizeof(m);
  m.flags = ((prot & kProtRead) != 0 ? VFIO_DMA_MAP_FLAG_READ : 0U) |
            ((prot & kProtWrite) != 0 ? VFIO_DMA_MAP_FLAG_WRITE : 0U);
  m.vaddr = reinterpret_cast<uintptr_t>(host);
  m.iova = iova;
  m.size = length;
  if (::ioctl(container_, VFIO_IOMMU_MAP_DMA, &m) != 0) {
    return kernel_error(errno, "VFIO_IOMMU_MAP_DMA");
  }
  mappings_.fetch_add(1, std::memory_order_relaxed);
  mapped_bytes_.fetch_add(length, std::memory_order_relaxed);
  return {};
}

void KernelVfioDomain::unmap(uint64_t iova, uint64_t length) noexcept {
  vfio_iommu_type1_dma_unmap u{};
  u.argsz = sizeof(u);
  u.iova = iova;
  u.size = length;
  const int rc = ::ioctl(container_, VFIO_IOMMU_UNMAP_DMA, &u);
  // Exactly a range MAP_DMA accepted: type1v2 removes it whole. Anything
  // else means the container no longer matches the IOAS.
  IOMM_CHECK(rc == 0 && u.size == length, "VFIO_IOMMU_UNMAP_DMA of a mapped range failed");
  mappings_.fetch_sub(1, std::memory_order_relaxed);
  mapped_bytes_.fetch_sub(length, std::memory_order_relaxed);
}

}  // namespace iomm
