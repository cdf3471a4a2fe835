// `iomm demo --scenario devmem`: a device's memory faulted in by two
// consumers (this process and a child over a unix socket), a memory disable
// that makes the next touch SIGBUS, a re-enable that restores the contents,
// and a P2P pool unbind that revokes a live mapping and a peer's IOAS
// mapping. Every step checks what the library promises.
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "commands.hpp"
#include "demo_checks.hpp"
#include "iomm/accounting.hpp"
#include "iomm/device_region.hpp"
#include "iomm/domain.hpp"
#include "iomm/guarded_copy.hpp"
#include "iomm/ioas.hpp"
#include "iomm/p2p_pool.hpp"
#include "output.hpp"

namespace iomm::cli {
namespace {

constexpr uint64_t kRegionSize = 4ULL << 20;
constexpr uint64_t kPoolSize = 1ULL << 20;
constexpr std::string_view kSignature = "iomm device memory, bar 0";
constexpr std::string_view kWhileDisabled = "written by the device while decode was off";

// The first `n` bytes at p, or nullopt if touching them raised the SIGBUS
// of disabled or revoked memory.
std::optional<std::string> touch(const std::byte* p, size_t n) {
  std::string out(n, '\0');
  if (!guarded_copy(out.data(), p, n)) return std::nullopt;
  return out;
}

// The service counts an install just after the kernel woke the faulting
// thread: wait (bounded) for the count to catch up.
RegionCounters settled(const DeviceRegion& region, uint64_t installed_bytes) {
  RegionCounters c = region.counters();
  for (int i = 0; i < 5000 && c.installed_bytes < installed_bytes; ++i) {
    usleep(1000);
    c = region.counters();
  }
  return c;
}

struct Row {
  std::string name;
  RegionCounters region;
  std::string note;
};

class DevmemDemo {
 public:
  void run(const std::function<void(size_t, const Row&)>& report) {
    // Lambdas rather than pointers to member functions: GCC 12's UBSan
    // misreads an index into an array of them as out of bounds.
    struct Step {
      std::string_view name;
      std::function<std::string()> run;
    };
    const Step kSteps[] = {
        {"create device region", [this] { return create_region(); }},
        {"consumer A faults in", [this] { return fault_in_here(); }},
        {"consumer B (child)", [this] { return fault_in_child(); }},
        {"disable memory", [this] { return disable(); }},
        {"enable memory", [this] { return enable(); }},
        {"P2P pool, peer DMA", [this] { return use_pool(); }},
        {"unbind pool", [this] { return unbind_pool(); }},
    };
    for (size_t i = 0; i < std::size(kSteps); ++i) {
      std::string note;
      try {
        note = kSteps[i].run();
      } catch (const DemoFailure& failure) {
        throw DemoFailure("step " + std::to_string(i + 1) + " (" + std::string(kSteps[i].name) +
                          "): " + failure.what());
      }
      report(i + 1, Row{std::string(kSteps[i].name), region_->counters(), std::move(note)});
    }
  }

 private:
  std::string create_region() {
    region_ =
        must(DeviceRegion::create(
                 {.name = "iomm-demo-bar0", .size = kRegionSize, .granularity = Granularity::huge}),
             "DeviceRegion::create");
    must(region_->write(0, kSignature.data(), kSignature.size()), "device write");
    const RegionCounters c = region_->counters();
    return format_bytes(kRegionSize) + " memfd, 2 MiB fault granularity, UFFDIO_POISON " +
           (c.poison ? "available" : "not available (SIGBUS via truncation)");
  }

  std::string fault_in_here() {
    mapping_ = must(DeviceMapping::map(region_, 0, kRegionSize), "DeviceMapping::map");
    const auto seen = touch(mapping_->data(), kSignature.size());
    expect(seen && *seen == kSignature, "consumer A does not see the device's signature");
    const RegionCounters c = settled(*region_, 2ULL << 20);
    expect(c.faults == 1 && c.installed_bytes == (2ULL << 20),
           "one fault should install one 2 MiB chunk");
    return "read \"" + *seen + "\": 1 fault, 2 MiB installed with UFFDIO_CONTINUE";
  }

  std::string fault_in_child() {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) {
      throw DemoFailure(std::string("socketpair: ") + errno_text(errno));
    }
    must(send_region(sv[0], region_->exported()), "send_region");
    must(region_->serve(sv[0]), "serve");
    const uint64_t before = region_->counters().installed_bytes;
    const pid_t child = fork();
    if (child < 0) throw DemoFailure(std::string("fork: ") + errno_text(errno));
    if (child == 0) {
      auto exported = receive_region(sv[1]);
      if (!exported.ok()) _exit(2);
      auto mapping = DeviceMapping::map_remote(sv[1], *exported, 0, kRegionSize);
      if (!mapping.ok()) _exit(3);
      const bool ok = std::memcmp((*mapping)->data(), kSignature.data(), kSignature.size()) == 0;
      mapping->reset();
      _exit(ok ? 0 : 4);
    }
    close(sv[1]);
    int status = 0;
    waitpid(child, &status, 0);
    expect(WIFEXITED(status) && WEXITSTATUS(status) == 0,
           "the child consumer failed (status " + std::to_string(status) + ")");
    const RegionCounters c = settled(*region_, before + (2ULL << 20));
    expect(c.installed_bytes == before + (2ULL << 20),
           "the child's fault should install one more chunk");
    return "pid " + std::to_string(child) +
           " mapped it over a unix socket (uffd passed with SCM_RIGHTS), read the signature";
  }

  std::string disable() {
    must(region_->set_memory_enabled(false), "disable");
    const auto seen = touch(mapping_->data(), 1);
    expect(!seen, "a touch after the disable should SIGBUS");
    must(region_->write(kPoolSize, kWhileDisabled.data(), kWhileDisabled.size()),
         "device write while disabled");
    return "view saved and truncated: the next touch got SIGBUS; the device still writes its "
           "memory";
  }

  std::string enable() {
    must(region_->set_memory_enabled(true), "enable");
    const auto sig = touch(mapping_->data(), kSignature.size());
    const auto late = touch(mapping_->data() + kPoolSize, kWhileDisabled.size());
    expect(sig && *sig == kSignature, "the contents did not survive the disable");
    expect(late && *late == kWhileDisabled, "the device's write while disabled is missing");
    return "contents restored; the device's write while disabled is there";
  }

  std::string use_pool() {
    pool_ = must(P2pPool::create({.name = "iomm-demo-p2p", .size = kPoolSize}), "P2pPool::create");
    block_ = must(pool_->allocate(kPoolSize / 2), "allocate");
    pool_mapping_ = must(DeviceMapping::map(block_->region(), 0, block_->length()), "map block");
    ioas_ = must(Ioas::create({}), "Ioas::create");
    domain_ = must(SoftDomain::create({}), "SoftDomain::create");
    must(ioas_->attach(domain_), "attach");
    iova_ = must(block_->map_into(ioas_, kProtRead | kProtWrite), "map_into");
    const std::string_view msg = "DMA from a peer device";
    must(domain_->dma_write(iova_, msg.data(), msg.size()), "peer DMA");
    const auto seen = touch(pool_mapping_->data(), msg.size());
    expect(seen && *seen == msg, "the consumer does not see the peer's DMA");
    expect(counters().charged_bytes == 0, "pool memory must not be charged to memlock");
    char iova[24];
    std::snprintf(iova, sizeof iova, "0x%llx", static_cast<unsigned long long>(iova_));
    return format_bytes(block_->length()) + " block mapped by a consumer and at IOVA " + iova +
           "; a peer's DMA is visible in the mapping; 0 charged";
  }

  std::string unbind_pool() {
    must(pool_->unbind(), "unbind");
    const auto seen = touch(pool_mapping_->data(), 1);
    expect(!seen, "the live mapping should SIGBUS after unbind");
    const Status dma = domain_->dma_write(iova_, "x", 1);
    expect(dma.code() == EFAULT, "peer DMA after unbind should fail with EFAULT");
    expect(ioas_->counters().mappings == 0, "the IOAS mapping should be revoked");
    const PoolCounters c = pool_->counters();
    expect(c.allocated_bytes == 0 && c.references == 0, "the pool should be empty");
    return "mapping survives but SIGBUSes; IOAS mapping revoked (DMA: EFAULT); pool empty";
  }

  std::shared_ptr<DeviceRegion> region_;
  std::unique_ptr<DeviceMapping> mapping_;
  std::shared_ptr<P2pPool> pool_;
  std::shared_ptr<P2pAllocation> block_;
  std::unique_ptr<DeviceMapping> pool_mapping_;
  std::shared_ptr<Ioas> ioas_;
  std::shared_ptr<SoftDomain> domain_;
  uint64_t iova_ = 0;
};

}  // namespace

int run_devmem_demo(const DemoOptions& options) {
  bool first = true;
  if (options.json) {
    std::printf("[");
  } else {
    std::printf("iomm demo: device memory (pid %d)\n\n", static_cast<int>(getpid()));
    std::printf("%-2s %-22s %6s %9s %7s %7s  %s\n", "#", "step", "faults", "installed", "refused",
                "memory", "note");
  }
  const auto report = [&](size_t number, const Row& row) {
    if (options.json) {
      const std::string obj = JsonObject()
                                  .add("step", number)
                                  .add("name", row.name)
                                  .add("faults", row.region.faults)
                                  .add("installed_bytes", row.region.installed_bytes)
                                  .add("refused", row.region.refused)
                                  .add("mappings", row.region.mappings)
                                  .add("enabled", row.region.enabled)
                                  .add("note", row.note)
                                  .str();
      std::printf("%s\n  %s", first ? "" : ",", obj.c_str());
    } else {
      std::printf("%-2zu %-22s %6llu %9s %7llu %7s  %s\n", number, row.name.c_str(),
                  static_cast<unsigned long long>(row.region.faults),
                  format_bytes(row.region.installed_bytes).c_str(),
                  static_cast<unsigned long long>(row.region.refused),
                  row.region.enabled ? "on" : "off", row.note.c_str());
    }
    first = false;
    std::fflush(stdout);
  };
  try {
    DevmemDemo demo;
    demo.run(report);
  } catch (const DemoFailure& failure) {
    if (options.json) std::printf("%s]\n", first ? "" : "\n");
    std::fflush(stdout);
    std::fprintf(stderr, "iomm demo: %s\n", failure.what());
    return 1;
  }
  if (options.json) {
    std::printf("\n]\n");
  } else {
    std::printf(
        "\nall steps checked: faults served, disable revoked, enable restored, unbind "
        "revoked\n");
  }
  return 0;
}

}  // namespace iomm::cli
