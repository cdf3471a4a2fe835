// Make a range of this process's address space resident and locked: one
// MADV_POPULATE_{READ,WRITE} (which, unlike mlock, reports a range it cannot
// fault in) and one mlock per run.
#pragma once

#include <cstdint>

#include "iomm/result.hpp"

namespace iomm::mem {

Status populate_and_lock(void* addr, uint64_t length, bool write);
// munlock; never fails (the range was locked by populate_and_lock).
void unlock_range(void* addr, uint64_t length) noexcept;

}  // namespace iomm::mem
