// The `iomm` subcommands, each a function returning the process exit code.
#pragma once

#include <cstdint>
#include <string>

namespace iomm::cli {

inline constexpr uint64_t kGiB = 1ULL << 30;

struct DemoOptions {
  bool json = false;
  uint64_t size = kGiB;  // bytes of guest memory
  // Pause before the final teardown, so `iomm stat` can watch a live process.
  unsigned hold_seconds = 0;
  // Run the steps on this VFIO group (/dev/vfio/N) with the kernel's
  // container as a domain (demo_vfio.cpp); -1: software domains only.
  int vfio_group = -1;
  // "guest" (demo.cpp: map, pin, DMA and unmap), "devmem"
  // (demo_devmem.cpp) or "invalidation" (notifiers on real events and the
  // ring cache: demo_invalidation.cpp).
  std::string scenario = "guest";
};

struct StatOptions {
  int pid = 0;  // 0: every process
  bool json = false;
};

struct VhostBlkOptions {
  std::string socket;
  std::string image;
  bool read_only = false;
  uint16_t num_queues = 1;
  uint16_t queue_size = 256;
  bool trace = false;
};

int run_demo(const DemoOptions& options);
int run_vfio_demo(const DemoOptions& options);
int run_devmem_demo(const DemoOptions& options);
int run_invalidation_demo();
int run_vhost_blk(const VhostBlkOptions& options);
int run_stat(const StatOptions& options);

}  // namespace iomm::cli
