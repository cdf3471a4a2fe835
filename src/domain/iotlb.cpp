#include "domain/iotlb.hpp"

namespace iomm::domain {

namespace {

std::atomic<uint64_t> g_last_generation{0};

uint64_t fresh_generation() noexcept {
  return g_last_generation.fetch_add(1, std::memory_order_relaxed) + 1;
}

}  // namespace

Iotlb::Iotlb() noexcept : generation_(fresh_generation()) {}

void Iotlb::invalidate() noexcept {
  generation_.store(fresh_generation(), std::memory_order_seq_cst);
}

}  // namespace iomm::domain
