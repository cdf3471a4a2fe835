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
  // "dma" (the walk through map, pin, DMA and unmap) or "invalidation"
  // (notifiers on real events and the ring cache: demo_invalidation.cpp).
  std::string scenario = "dma";
};

struct StatOptions {
  int pid = 0;  // 0: every process
  bool json = false;
};

int run_demo(const DemoOptions& options);
int run_invalidation_demo();
int run_stat(const StatOptions& options);

}  // namespace iomm::cli
