// Touching device memory that may be revoked under the test.
#pragma once

#include <cstddef>
#include <cstdint>

#include "iomm/guarded_copy.hpp"

namespace iomm::test {

// A word read or written through iomm::guarded_copy: false if the access
// raised the SIGBUS of revoked or disabled memory.
inline bool probe_read(const void* address, uint64_t* out) {
  return guarded_copy(out, address, sizeof(*out)).ok();
}
inline bool probe_write(void* address, uint64_t value) {
  return guarded_copy(address, &value, sizeof(value)).ok();
}

// The word the device keeps at `offset` in the tests' pattern.
inline uint64_t device_word(uint64_t offset, uint64_t generation) {
  return (offset * 0x9e3779b97f4a7c15ULL) ^ (generation << 56) ^ 0x00de51cedeadbeefULL;
}

}  // namespace iomm::test
