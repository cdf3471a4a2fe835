// External domains of an IOAS (include/iomm/external_domain.hpp): the map
// and unmap steps the IOAS's own paths call. st.domains_mu is held by the
// caller (shared or exclusive), tree_mu is not.
#pragma once

#include <memory>
#include <vector>

#include "ioas/area.hpp"
#include "ioas/ioas_state.hpp"

namespace iomm::ioas {

// Map the areas into every external domain; all or nothing.
Status map_external(const IoasState& st, const std::vector<std::shared_ptr<Area>>& areas);
// Remove one area's range from every external domain.
void unmap_external(const IoasState& st, const Area& area) noexcept;

}  // namespace iomm::ioas
