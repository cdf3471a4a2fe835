#include "ioas_sequence/generators.hpp"

namespace iomm::fuzz::ioas_sequence {

namespace {

// Value pickers: small tables of interesting values, page multiples, or raw.

constexpr uint64_t kIovaTable[] = {
    0,
    1,
    0x800,
    0x1000,
    0x2000,
    0x10000,
    0x100000,
    0x200000,
    0x400000,
    0x1000000,
    0xfee00000,
    (1ULL << 39) - 0x1000,
    1ULL << 47,
    (1ULL << 48) - 0x1000,
    1ULL << 48,
    kMax,
    kMax - 0xfff,
    kMax - 0x1fff,
    kMax - 1,
    kMax - 0x1000,
};

constexpr uint64_t kLenTable[] = {
    0,       1,       0xfff,    0x1000,   0x1001,     0x2000,     0x3000, 0x8000,
    0x10000, 0x40000, 0x100000, 0x200000, 1ULL << 30, 1ULL << 47, kMax,   kMax - 0xfff,
};

constexpr size_t kIovaN = std::size(kIovaTable);

constexpr size_t kLenN = std::size(kLenTable);

uint64_t pick_iova_byte(Reader& in, uint8_t b) {
  if (b < kIovaN) return kIovaTable[b];
  if (b == 0xff) return in.u64();
  return (b - kIovaN) * kPageSize;
}

}  // namespace

uint64_t pick_len(Reader& in) {
  const uint8_t b = in.u8();
  if (b < kLenN) return kLenTable[b];
  if (b == 0xff) return in.u64();
  return (b - kLenN) * kPageSize;
}

uint64_t pick_iova_rel(Reader& in, const IoasModel* m) {
  const uint8_t b = in.u8();
  if (b >= 0xc0 && b != 0xff && m != nullptr && !m->areas.empty()) {
    auto it = m->areas.begin();
    std::advance(it, (b - 0xc0) % m->areas.size());
    const AreaModel& a = it->second;
    const uint64_t deltas[] = {0,
                               kPageSize,
                               (a.len / 2) & ~(kPageSize - 1),
                               a.len - kPageSize,
                               a.len,
                               uint64_t{0} - kPageSize,
                               1,
                               a.len - 1};
    return a.iova + deltas[in.u8() % std::size(deltas)];
  }
  return pick_iova_byte(in, b);
}

uint64_t pick_len_rel(Reader& in, const IoasModel* m, uint64_t iova) {
  const uint8_t b = in.u8();
  if (b >= 0xe0 && b != 0xff && m != nullptr) {
    auto it = m->areas.lower_bound(iova);
    if (const AreaModel* a = m->find(iova)) it = m->areas.find(a->iova);
    for (int k = (b - 0xe0) % 4; k > 0 && it != m->areas.end(); --k) ++it;
    if (it != m->areas.end()) return it->second.last() - iova + 1;
    return kPageSize;
  }
  if (b < kLenN) return kLenTable[b];
  if (b == 0xff) return in.u64();
  return (b - kLenN) * kPageSize;
}

uint32_t pick_prot(uint8_t b) {
  uint32_t p = b & 3;
  if ((b & 0x80) != 0) p |= 4;  // an unknown bit
  return p;
}

}  // namespace iomm::fuzz::ioas_sequence
