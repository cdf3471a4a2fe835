// Synthetic memory: page identities and addresses with nothing behind them,
// so terabytes can be mapped, pinned, charged and translated on a small
// machine. Its addresses are (serial << 47) | offset.
#pragma once

#include <memory>

#include "mem/mem_object.hpp"

namespace iomm::mem {

inline constexpr uint64_t kSimulatedMaxLength = 1ULL << 47;

Result<std::shared_ptr<MemObject>> make_simulated_object();

}  // namespace iomm::mem
