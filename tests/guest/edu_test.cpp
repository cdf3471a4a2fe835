// The kernel VFIO domain end to end, inside a guest: QEMU's edu device
// (docs/specs/edu.rst) bound to vfio-pci does DMA through mappings made by
// an iomm IOAS whose domain is the kernel's type1 container.
#include <fcntl.h>
#include <linux/vfio.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>

#include "guest_report.hpp"
#include "iomm/accounting.hpp"
#include "iomm/ioas.hpp"
#include "iomm/kernel_vfio.hpp"
#include "iomm/source.hpp"

namespace iomm::guest {

namespace {

// Below edu's default 28-bit DMA mask.
constexpr uint64_t kIova = 0x100000;
constexpr size_t kLength = 2 * 4096;
// The device's buffer; QEMU 7.2 aborts on a transfer that ends exactly at
// its end (edu_check_range is off by one), so stay below 4096 bytes.
constexpr uint64_t kEduBuffer = 0x40000;
constexpr uint64_t kTransfer = 2048;

class Edu {
 public:
  Edu(int fd, volatile uint8_t* bar) : fd_(fd), bar_(bar) {}
  ~Edu() {
    ::munmap(const_cast<uint8_t*>(bar_), 1 << 20);
    ::close(fd_);
  }
  Edu(const Edu&) = delete;
  Edu& operator=(const Edu&) = delete;

  uint32_t read32(unsigned off) const { return *reinterpret_cast<volatile uint32_t*>(bar_ + off); }
  void write64(unsigned off, uint64_t v) { *reinterpret_cast<volatile uint64_t*>(bar_ + off) = v; }
  uint64_t read64(unsigned off) const { return *reinterpret_cast<volatile uint64_t*>(bar_ + off); }

  // One DMA; false if it did not complete within 5 s (it takes 100 ms of
  // virtual time).
  bool dma(uint64_t src, uint64_t dst, uint64_t count, bool to_ram) {
    write64(0x80, src);
    write64(0x88, dst);
    write64(0x90, count);
    write64(0x98, 1 | (to_ram ? 2 : 0));
    timespec start{};
    ::clock_gettime(CLOCK_MONOTONIC, &start);
    while ((read64(0x98) & 1) != 0) {
      timespec now{};
      ::clock_gettime(CLOCK_MONOTONIC, &now);
      if (now.tv_sec - start.tv_sec > 5) return false;
      ::usleep(1000);
    }
    return true;
  }

 private:
  int fd_;
  volatile uint8_t* bar_;
};

std::string err(const Error& e) { return e.describe(); }

}  // namespace

int edu_main(const std::string& bdf, int group) {
  auto opened = KernelVfioDomain::open(group);
  if (!expect(opened.ok(), "kvfio.open", opened ? "" : err(opened.error()))) return 1;
  auto kernel = *opened;

  auto info = kernel->info();
  if (!expect(info.ok() && (info->page_sizes & 4096) != 0 && !info->iova_ranges.empty(),
              "kvfio.info", info ? "no 4 KiB page size or no IOVA range" : err(info.error()))) {
    return 1;
  }
  std::printf("kernel: iova_pgsizes=0x%llx dma_avail=%u\n",
              static_cast<unsigned long long>(info->page_sizes), info->dma_avail);
  for (const IovaRange& r : info->iova_ranges) {
    std::printf("kernel: iova range 0x%llx-0x%llx\n", static_cast<unsigned long long>(r.start),
                static_cast<unsigned long long>(r.last));
  }

  auto ioas = Ioas::create().value();
  if (Status s = ioas->attach_external(kernel);
      !expect(s.ok(), "ioas.attach", s ? "" : err(s.error()))) {
    return 1;
  }
  // The kernel's holes (the MSI window on x86) are reserved in the IOAS.
  const auto ranges = ioas->iova_ranges();
  expect(ranges == info->iova_ranges, "ioas.ranges_from_kernel",
         "the IOAS's usable ranges differ from the kernel's");

  auto* buf = static_cast<uint8_t*>(
      ::mmap(nullptr, kLength, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (buf == MAP_FAILED) {
    fail("buffer", std::strerror(errno));
    return 1;
  }
  std::memset(buf, 0, kLength);
  auto src = MemorySource::from_user(buf, kLength).value();

  // A mapping in the kernel's reserved MSI window is refused by the IOAS.
  {
    auto in_msi = ioas->map(src, kProtRead | kProtWrite, 0xfee00000ULL);
    expect(!in_msi && in_msi.error().code() == EINVAL, "ioas.map_reserved_einval",
           in_msi ? "mapped inside the MSI window" : err(in_msi.error()));
  }
  // Kernel errors come back unchanged: memory that is not there is EFAULT
  // from the kernel's pin.
  {
    void* hole = ::mmap(nullptr, kLength, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    auto bad = MemorySource::from_user(hole, kLength).value();
    auto r = ioas->map(bad, kProtRead | kProtWrite, kIova);
    expect(!r && r.error().code() == EFAULT && kernel->counters().mappings == 0 &&
               ioas->mappings().empty(),
           "ioas.map_kernel_efault", r ? "mapped PROT_NONE memory" : err(r.error()));
    ::munmap(hole, kLength);
  }

  const uint64_t vmlck_before = process_vmlck_bytes();
  auto mapped = ioas->map(src, kProtRead | kProtWrite, kIova);
  if (!expect(mapped.ok() && *mapped == kIova && kernel->counters().mappings == 1,
              "ioas.map_kernel", mapped ? "not in the kernel" : err(mapped.error()))) {
    return 1;
  }
  // The kernel pinned and charged the pages (its locked_vm is VmLck); iomm
  // pinned and charged nothing.
  const Counters c = counters();
  const uint64_t vmlck = process_vmlck_bytes();
  expect(c.pinned_bytes == 0 && c.charged_bytes == 0 && vmlck - vmlck_before == kLength,
         "ioas.charged_once_by_kernel",
         "iomm pinned " + std::to_string(c.pinned_bytes) + " charged " +
             std::to_string(c.charged_bytes) + ", VmLck grew by " +
             std::to_string(vmlck - vmlck_before));

  auto dev = kernel->device_fd(bdf);
  if (!expect(dev.ok(), "edu.device_fd", dev ? "" : err(dev.error()))) return 1;
  vfio_region_info bar_info{};
  bar_info.argsz = sizeof(bar_info);
  bar_info.index = VFIO_PCI_BAR0_REGION_INDEX;
  vfio_region_info cfg_info{};
  cfg_info.argsz = sizeof(cfg_info);
  cfg_info.index = VFIO_PCI_CONFIG_REGION_INDEX;
  if (::ioctl(*dev, VFIO_DEVICE_GET_REGION_INFO, &bar_info) != 0 ||
      ::ioctl(*dev, VFIO_DEVICE_GET_REGION_INFO, &cfg_info) != 0) {
    fail("edu.regions", std::strerror(errno));
    return 1;
  }
  void* bar = ::mmap(nullptr, bar_info.size, PROT_READ | PROT_WRITE, MAP_SHARED, *dev,
                     static_cast<off_t>(bar_info.offset));
  if (bar == MAP_FAILED) {
    fail("edu.bar0", std::strerror(errno));
    return 1;
  }
  // Memory space and bus mastering: without them edu's DMA goes nowhere.
  uint16_t command = 0;
  if (::pread(*dev, &command, 2, static_cast<off_t>(cfg_info.offset + 4)) != 2) {
    fail("edu.config", std::strerror(errno));
    return 1;
  }
  command |= 0x6;
  if (::pwrite(*dev, &command, 2, static_cast<off_t>(cfg_info.offset + 4)) != 2) {
    fail("edu.config", std::strerror(errno));
    return 1;
  }
  Edu edu(*dev, static_cast<volatile uint8_t*>(bar));
  if (!expect(edu.read32(0) == 0x010000ed, "edu.id", "unexpected id")) return 1;

  for (uint64_t i = 0; i < kTransfer; ++i) buf[i] = static_cast<uint8_t>(i * 7 + 3);
  const bool to_dev = edu.dma(kIova, kEduBuffer, kTransfer, false);
  const bool to_ram = edu.dma(kEduBuffer, kIova + 4096, kTransfer, true);
  expect(to_dev && to_ram && std::memcmp(buf, buf + 4096, kTransfer) == 0, "edu.dma_both_ways",
         !to_dev || !to_ram ? "a DMA did not complete" : "the data came back different");

  auto unmapped = ioas->unmap(kIova, kLength);
  expect(unmapped.ok() && *unmapped == kLength && kernel->counters().mappings == 0 &&
             process_vmlck_bytes() == vmlck_before,
         "ioas.unmap_kernel", unmapped ? "the kernel still holds it" : err(unmapped.error()));

  // After the unmap the IOMMU blocks the device: the buffer stays as it is
  // (the fault is in the guest's dmesg: DMAR ... PTE Write access is not set).
  std::memset(buf + 4096, 0x5a, 4096);
  edu.dma(kEduBuffer, kIova + 4096, 64, true);
  bool untouched = true;
  for (int i = 0; i < 64; ++i) untouched = untouched && buf[4096 + i] == 0x5a;
  expect(untouched, "edu.dma_after_unmap_blocked", "the device wrote into unmapped memory");

  // Detaching takes the kernel domain's remaining mappings with it.
  auto again = ioas->map(src, kProtRead, kIova);
  Status detached = ioas->detach_external(kernel);
  expect(again.ok() && detached.ok() && kernel->counters().mappings == 0 &&
             ioas->mappings().size() == 1,
         "ioas.detach_unmaps_kernel", detached ? "" : err(detached.error()));
  ::munmap(buf, kLength);
  return failures == 0 ? 0 : 1;
}

}  // namespace iomm::guest
