#include "ioas_sequence/operations.hpp"

namespace iomm::fuzz::ioas_sequence {

void run_op(Op op, Reader& in) {
  switch (op) {
    case kMap:
      return op_map(in);
    case kUnmap:
      return op_unmap(in);
    case kCopy:
      return op_copy(in);
    case kAttach:
      return op_attach(in, true);
    case kDetach:
      return op_attach(in, false);
    case kDomainCreate:
      return op_domain_create(in);
    case kAccessCreate:
      return op_access_create(in);
    case kAccessDestroy:
      w->access[in.u8() & 1].reset();
      return;
    case kPin:
      return op_pin(in);
    case kUnpin:
      return op_unpin(in);
    case kAccessRw:
      return op_access_rw(in);
    case kDma:
      return op_dma(in);
    case kTranslate:
      return op_translate(in);
    case kSetAllowed:
      return op_set_allowed(in);
    case kReserved:
      return op_reserved(in);
    case kRecreateIoas:
      return op_recreate_ioas(in);
    case kSetLimit:
      return op_set_limit(in);
    case kTakeFaults:
      return op_take_faults(in);
    case kDirty:
      return op_dirty(in);
    case kPinPages:
      return op_pin_pages(in);
    case kUnpinPages:
      return op_unpin_pages(in);
    case kLive:
      return op_live(in);
    case kRound:
      return op_round(in);
    case kOpCount:
      break;
  }
}

}  // namespace iomm::fuzz::ioas_sequence
