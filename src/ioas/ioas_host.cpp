// Host addresses for notifier-guarded consumers (Ioas::host_segments; see
// include/iomm/ioas.hpp for the contract).
#include <algorithm>
#include <new>

#include "fault/inject.hpp"
#include "ioas/ioas_state.hpp"
#include "iomm/ioas.hpp"

namespace iomm {

using ioas::Area;
using ioas::AreaState;

Result<std::vector<Ioas::HostSegment>> Ioas::host_segments(uint64_t iova, uint64_t length,
                                                           uint32_t prot) const {
  std::vector<HostSegment> out;
  if (Status s = host_segments(iova, length, prot, out); !s) return s.error();
  return out;
}

Status Ioas::host_segments(uint64_t iova, uint64_t length, uint32_t prot,
                           std::vector<HostSegment>& out) const {
  if (length == 0) return Error(EINVAL, "zero length");
  const auto r = make_range(iova, length);
  if (!r) return Error(EOVERFLOW, "iova + length wraps");
  if ((prot & ~(kProtRead | kProtWrite)) != 0 || prot == 0) return Error(EINVAL, "bad prot");
  const size_t first = out.size();
  // Shrinking back never allocates: the caller's vector is as it was.
  auto fail = [&](Error e) -> Status {
    out.resize(first);
    return e;
  };
  try {
    std::shared_lock tree(state_->tree_mu);
    const ioas::IoasState& st = *state_;
    uint64_t pos = r->start;
    for (auto it = st.first_overlap(*r); it != st.areas.end() && it->first <= r->last; ++it) {
      const Area& a = *it->second;
      if (a.range.start > pos || a.state != AreaState::live) break;
      if (a.host_invalid)
        return fail(Error(EBUSY, "the host address of the range is being updated"));
      if ((a.prot & prot) != prot) return fail(Error(EPERM, "mapping does not allow this access"));
      const mem::MemObject& obj = *a.source.object();
      if (obj.synthetic()) return fail(Error(ENXIO, "no memory behind a simulated mapping"));
      const uint64_t last = std::min(a.range.last, r->last);
      const uint64_t n = last - pos + 1;
      auto* host = static_cast<std::byte*>(obj.host(a.backing_offset(pos)));
      // A file that may shrink (FileSeal::allow_shrink) could SIGBUS a plain
      // load: its consumers copy with guarded copies instead.
      const bool library = obj.host_access() == mem::HostAccess::direct && obj.shrink_sealed();
      if (out.size() > first &&
          static_cast<std::byte*>(out.back().host) + out.back().length == host &&
          out.back().library_mapped == library) {
        out.back().length += n;
      } else {
        if (IOMM_INJECT("ioas.alloc_host_segments")) throw std::bad_alloc();
        out.push_back({pos, n, host, library});
      }
      if (last == r->last) return {};
      pos = last + 1;
    }
  } catch (const std::bad_alloc&) {
    return fail(Error(ENOMEM, "out of memory"));
  }
  return fail(Error(ENOENT, "part of the range is not mapped"));
}

}  // namespace iomm
