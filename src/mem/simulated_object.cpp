#include "mem/simulated_object.hpp"

#include <atomic>

#include "fault/inject.hpp"

namespace iomm::mem {

namespace {

class SimulatedObject final : public MemObject {
 public:
  explicit SimulatedObject(uint64_t serial)
      : MemObject(SourceKind::simulated, kPageShift), base_(serial << 47) {}

  [[nodiscard]] uint64_t dma_address(uint64_t offset) const noexcept override {
    return base_ | offset;
  }
  [[nodiscard]] void* host(uint64_t /*offset*/) const noexcept override { return nullptr; }
  [[nodiscard]] HostAccess host_access() const noexcept override { return HostAccess::none; }
  // No memory to copy (callers report ENXIO before getting here).
  // Nothing can take it away (and DMA to it is ENXIO anyway).
  [[nodiscard]] bool present(uint64_t /*offset*/, uint64_t /*length*/) const noexcept override {
    return true;
  }
  bool copy_out(uint64_t /*offset*/, void* /*buf*/, size_t /*n*/) const noexcept override {
    return false;
  }
  bool copy_in(uint64_t /*offset*/, const void* /*buf*/, size_t /*n*/) const noexcept override {
    return false;
  }

 protected:
  // Nothing to make resident: the pin is bookkeeping and charge only.
  Status lock_granules(uint64_t /*first*/, uint64_t /*last*/, bool /*write*/) override {
    return {};
  }
  void unlock_granules(uint64_t /*first*/, uint64_t /*last*/) noexcept override {}

 private:
  const uint64_t base_;
};

std::atomic<uint64_t> g_next_serial{1};

}  // namespace

Result<std::shared_ptr<MemObject>> make_simulated_object() {
  if (IOMM_INJECT("mem.alloc_object")) return Error(ENOMEM, "out of memory (injected)");
  const uint64_t serial = g_next_serial.fetch_add(1, std::memory_order_relaxed);
  if (serial >= (1ULL << 17)) return Error(ENOSPC, "too many simulated sources in this process");
  return std::shared_ptr<MemObject>(std::make_shared<SimulatedObject>(serial));
}

}  // namespace iomm::mem
