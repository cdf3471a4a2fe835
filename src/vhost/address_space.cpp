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

}  // namespace iomm::vhost
