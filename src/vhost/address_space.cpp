#include "vhost/address_space.hpp"

#include <cstdlib>

namespace iomm::vhost {

Result<AddressSpace> AddressSpace::create() {
  IoasOptions options;
  options.account_mode = AccountMode::none;
  auto ioas = Ioas::create(options);
  if (!ioas) return std::move(ioas).error();
  // The access only copies; it never pins, so an unmap never has anything
  // to ask it to release.
  auto access = Access::create(*ioas, [](const IovaRange&) {});
  if (!access) return std::move(access).error();
  return AddressSpace(std::move(*ioas), std::move(*access));
}

Result<uint64_t> AddressSpace::map(const MemorySource& source, uint32_t prot, uint64_t iova) const {
  if (source.kind() != SourceKind::file)
    return Error(EINVAL, "guest memory must be a file the front end sent");
  return ioas_->map(source, prot, iova);
}

Status AddressSpace::segments(uint64_t addr, uint64_t length, bool device_writes,
                              std::vector<Ioas::HostSegment>& out) const {
  return note(ioas_->host_segments(addr, length, device_writes ? kProtWrite : kProtRead, out), addr,
              length, device_writes);
}

}  // namespace iomm::vhost
