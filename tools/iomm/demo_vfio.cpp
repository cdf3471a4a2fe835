// `iomm demo --vfio-group N`: the demo's map, alias, attach and unmap steps
// on a real VFIO group, with the kernel's type1 container as a domain of the
// IOAS (iomm/kernel_vfio.hpp). Each step shows iomm's counters next to the
// kernel's (its mappings, and VmLck, where type1 charges) and checks them.
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>

#include "commands.hpp"
#include "demo_checks.hpp"
#include "iomm/accounting.hpp"
#include "iomm/domain.hpp"
#include "iomm/ioas.hpp"
#include "iomm/kernel_vfio.hpp"
#include "iomm/source.hpp"
#include "output.hpp"

namespace iomm::cli {
namespace {

class VfioDemo {
 public:
  VfioDemo(const DemoOptions& o) : o_(o) {}

  void run() {
    kernel_ = must(KernelVfioDomain::open(o_.vfio_group),
                   "open VFIO group " + std::to_string(o_.vfio_group));
    const KernelIommuInfo info = must(kernel_->info(), "VFIO_IOMMU_GET_INFO");
    std::printf(
        "iomm demo on VFIO group %d (pid %d): kernel iova_pgsizes 0x%llx, %zu IOVA ranges\n\n",
        o_.vfio_group, static_cast<int>(getpid()), static_cast<unsigned long long>(info.page_sizes),
        info.iova_ranges.size());
    std::printf(kRow, "#", "step", "maps", "kernel maps", "iomm pinned", "VmLck", "note");

    const int fd = memfd_create("iomm-demo-guest", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0 || ftruncate(fd, static_cast<off_t>(o_.size)) != 0) {
      throw DemoFailure(std::string("memfd: ") + errno_text(errno));
    }
    source_ =
        must(MemorySource::from_file(fd, 0, o_.size, FileSeal::apply), "MemorySource::from_file");
    close(fd);
    ioas_ = must(Ioas::create(), "Ioas::create");
    base_vmlck_ = process_vmlck_bytes();

    must(ioas_->attach_external(kernel_), "attach the kernel domain");
    row(1, "attach kernel domain", "IOVA ranges and page size from the kernel");

    const uint64_t first = must(ioas_->map(*source_, kProtRead | kProtWrite), "map");
    expect(kernel_->counters().mappings == 1 && counters().pinned_bytes == 0,
           "the kernel should hold the mapping and iomm pin nothing");
    expect(process_vmlck_bytes() - base_vmlck_ == o_.size, "the kernel should charge the pages");
    row(2, "map", "MAP_DMA: the kernel pins and charges; iomm pins nothing");

    const uint64_t alias = must(ioas_->map(*source_, kProtRead | kProtWrite), "map again");
    expect(process_vmlck_bytes() - base_vmlck_ == 2 * o_.size,
           "type1 charges per mapping: the alias should be charged again");
    row(3, "map again (alias)", "type1 charges the same pages twice (docs/kernel-differences.md)");

    auto soft = must(SoftDomain::create({}), "SoftDomain::create");
    must(ioas_->attach(soft), "attach software domain");
    expect(counters().pinned_bytes == o_.size, "the software domain pins the memory once");
    row(4, "attach software domain", "iomm pins once for its own domain");

    const uint64_t unmapped = must(ioas_->unmap(first, o_.size), "unmap");
    expect(unmapped == o_.size && kernel_->counters().mappings == 1, "one mapping should remain");
    row(5, "unmap first mapping", "UNMAP_DMA of exactly that range");

    if (o_.hold_seconds != 0) {
      std::fprintf(stderr, "holding %u s before teardown; try: iomm stat --pid %d\n",
                   o_.hold_seconds, static_cast<int>(getpid()));
      std::this_thread::sleep_for(std::chrono::seconds(o_.hold_seconds));
    }
    must(ioas_->unmap_all(), "unmap_all");
    must(ioas_->detach(soft), "detach");
    must(ioas_->detach_external(kernel_), "detach the kernel domain");
    expect(kernel_->counters().mappings == 0 && counters().pinned_bytes == 0 &&
               process_vmlck_bytes() == base_vmlck_,
           "everything should be released");
    row(6, "unmap all, detach", "alias at " + hex(alias) + " gone; nothing pinned or charged");
    std::printf("\nall steps checked on the kernel's container\n");
  }

 private:
  static constexpr const char* kRow = "%-2s %-22s %4s %11s %11s %9s  %s\n";

  static std::string hex(uint64_t v) {
    char b[24];
    std::snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(v));
    return b;
  }

  void row(int n, const char* step, const std::string& note) const {
    const KernelVfioCounters k = kernel_->counters();
    std::printf(kRow, std::to_string(n).c_str(), step,
                std::to_string(ioas_->counters().mappings).c_str(),
                std::to_string(k.mappings).c_str(), format_bytes(counters().pinned_bytes).c_str(),
                format_bytes(process_vmlck_bytes()).c_str(), note.c_str());
    std::fflush(stdout);
  }

  const DemoOptions o_;
  std::shared_ptr<KernelVfioDomain> kernel_;
  std::optional<MemorySource> source_;
  std::shared_ptr<Ioas> ioas_;
  uint64_t base_vmlck_ = 0;
};

}  // namespace

int run_vfio_demo(const DemoOptions& options) {
  if (options.json) {
    std::fprintf(stderr, "iomm demo: --json is not available with --vfio-group\n");
    return 2;
  }
  try {
    VfioDemo demo(options);
    demo.run();
  } catch (const DemoFailure& f) {
    std::fflush(stdout);
    std::fprintf(stderr, "iomm demo: %s\n", f.what());
    return 1;
  }
  return 0;
}

}  // namespace iomm::cli
