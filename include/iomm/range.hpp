// IOVA ranges with an inclusive last address, so [0, UINT64_MAX] is
// representable, and overflow-checked arithmetic for start + length.
#pragma once

#include <cstdint>
#include <optional>

#include "iomm/export.hpp"

namespace iomm {

inline constexpr uint64_t kPageSize = 4096;
inline constexpr unsigned kPageShift = 12;

struct IOMM_API IovaRange {
  uint64_t start = 0;
  uint64_t last = 0;  // inclusive

  friend bool operator==(const IovaRange&, const IovaRange&) = default;
  [[nodiscard]] bool overlaps(const IovaRange& o) const noexcept {
    return start <= o.last && o.start <= last;
  }
  [[nodiscard]] bool contains(const IovaRange& o) const noexcept {
    return start <= o.start && o.last <= last;
  }
  // Number of bytes, or nullopt for the full 2^64 range.
  [[nodiscard]] std::optional<uint64_t> length() const noexcept {
    if (start == 0 && last == UINT64_MAX) return std::nullopt;
    return last - start + 1;
  }
};

// [start, start + length - 1], or nullopt if length is 0 or the end wraps.
inline std::optional<IovaRange> make_range(uint64_t start, uint64_t length) noexcept {
  uint64_t last = 0;
  if (length == 0 || __builtin_add_overflow(start, length - 1, &last)) return std::nullopt;
  return IovaRange{start, last};
}

inline bool is_aligned(uint64_t v, uint64_t alignment) noexcept {
  return (v & (alignment - 1)) == 0;
}

}  // namespace iomm
