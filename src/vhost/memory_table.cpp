#include "vhost/memory_table.hpp"

#include <algorithm>
#include <string>

#include "iomm/domain.hpp"
#include "iomm/range.hpp"

namespace iomm::vhost {

namespace {

bool overlap_in(std::vector<IovaRange> ranges) {
  std::sort(ranges.begin(), ranges.end(),
            [](const IovaRange& a, const IovaRange& b) { return a.start < b.start; });
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].start <= ranges[i - 1].last) return true;
  return false;
}

}  // namespace

Result<MemoryTable> MemoryTable::create(std::span<const MemRegion> regions,
                                        std::vector<UniqueFd> fds) {
  if (regions.size() > kMaxMemRegions)
    return Error(EINVAL, std::to_string(regions.size()) + " memory regions, at most " +
                             std::to_string(kMaxMemRegions));
  if (fds.size() != regions.size())
    return Error(EINVAL, std::to_string(regions.size()) + " memory regions came with " +
                             std::to_string(fds.size()) + " fds");
  std::vector<IovaRange> gpas;
  std::vector<IovaRange> uaddrs;
  for (const MemRegion& r : regions) {
    if (r.memory_size == 0) return Error(EINVAL, "a memory region of size 0");
    auto g = make_range(r.guest_phys_addr, r.memory_size);
    auto u = make_range(r.userspace_addr, r.memory_size);
    uint64_t end = 0;
    if (!g || !u || __builtin_add_overflow(r.mmap_offset, r.memory_size, &end))
      return Error(EOVERFLOW, "a memory region wraps the 64-bit address space");
    gpas.push_back(*g);
    uaddrs.push_back(*u);
  }
  if (overlap_in(gpas)) return Error(EINVAL, "memory regions overlap in guest-physical space");
  if (overlap_in(uaddrs)) return Error(EINVAL, "memory regions overlap in front-end address space");

  auto space = AddressSpace::create();
  if (!space) return std::move(space).error();
  std::vector<GuestRegion> out;
  out.reserve(regions.size());
  for (size_t i = 0; i < regions.size(); ++i) {
    const MemRegion& r = regions[i];
    auto source =
        MemorySource::from_file(fds[i].get(), r.mmap_offset, r.memory_size, FileSeal::allow_shrink);
    if (!source) return std::move(source).error();
    const uint32_t prot = source->writable() ? (kProtRead | kProtWrite) : kProtRead;
    auto mapped = space->map(*source, prot, r.guest_phys_addr);
    if (!mapped)
      return Error(mapped.code(), "memory region at guest-physical " + hex(r.guest_phys_addr) +
                                      ": " + mapped.error().message());
    out.push_back(
        GuestRegion{r.guest_phys_addr, r.memory_size, r.userspace_addr, std::move(*source)});
  }
  return MemoryTable(std::move(out), std::move(*space));
}

std::optional<uint64_t> MemoryTable::uaddr_to_gpa(uint64_t uaddr) const noexcept {
  for (const GuestRegion& r : regions_)
    if (uaddr >= r.uaddr && uaddr - r.uaddr < r.size) return r.gpa + (uaddr - r.uaddr);
  return std::nullopt;
}

Result<std::vector<UaddrPiece>> MemoryTable::resolve_uaddr(uint64_t uaddr, uint64_t length) const {
  if (length == 0) return Error(EINVAL, "zero length");
  if (!make_range(uaddr, length)) return Error(EOVERFLOW, "front-end address range wraps");
  std::vector<UaddrPiece> pieces;
  uint64_t pos = uaddr;
  uint64_t left = length;
  while (left > 0) {
    const GuestRegion* found = nullptr;
    for (const GuestRegion& r : regions_)
      if (pos >= r.uaddr && pos - r.uaddr < r.size) found = &r;
    if (found == nullptr)
      return Error(ENOENT, "front-end address " + hex(pos) + " is in no memory region");
    const uint64_t offset = pos - found->uaddr;
    const uint64_t n = std::min(left, found->size - offset);
    pieces.push_back(UaddrPiece{found, offset, n});
    pos += n;
    left -= n;
  }
  return pieces;
}

}  // namespace iomm::vhost
