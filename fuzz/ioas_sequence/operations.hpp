// The operations of the IOAS sequence fuzzer. Each reads its arguments from
// the input, calls the library, checks the result against the model's
// prediction (oracle.hpp) and updates the model. run_op() dispatches one
// opcode.
#pragma once

#include "ioas_sequence/model.hpp"

namespace iomm::fuzz::ioas_sequence {

const std::optional<uint64_t> kLimits[] = {std::nullopt, 0,        16 * kKiB,
                                           256 * kKiB,   1 * kMiB, 4 * kMiB};

enum Op : uint8_t {
  kMap,
  kUnmap,
  kCopy,
  kAttach,
  kDetach,
  kDomainCreate,
  kAccessCreate,
  kAccessDestroy,
  kPin,
  kUnpin,
  kAccessRw,
  kDma,
  kTranslate,
  kSetAllowed,
  kReserved,
  kRecreateIoas,
  kSetLimit,
  kTakeFaults,
  kDirty,
  kPinPages,
  kUnpinPages,
  kLive,
  kRound,
  kOpCount,
};

const char* const kOpNames[] = {
    "map",           "unmap",
    "copy_from",     "attach",
    "detach",        "domain_create",
    "access_create", "access_destroy",
    "pin",           "unpin",
    "access_rw",     "dma",
    "translate",     "set_allowed_ranges",
    "reserved",      "recreate_ioas",
    "set_limit",     "take_faults",
    "dirty",         "pin_pages",
    "unpin_pages",   "live_update",
    "round",
};

static_assert(std::size(kOpNames) == kOpCount);

// Address spaces and domains (address_space_ops.cpp).
void op_map(Reader& in);
void op_copy(Reader& in);
void op_unmap(Reader& in);
void op_attach(Reader& in, bool attach);
void op_domain_create(Reader& in);
void op_set_allowed(Reader& in);
void op_reserved(Reader& in);
std::shared_ptr<IoasModel> create_ioas(uint8_t b);
void op_recreate_ioas(Reader& in);
void op_set_limit(Reader& in);
void op_live(Reader& in);

// The errno map() gives, checked in the library's order: arguments, then
// alignment, then (for a fixed IOVA) placement, the mapping limit, and with
// a domain attached pinning and charging (predict_pins). -1 where the model
// cannot tell: the allocation of a free IOVA.
int predict_map_errno(const IoasModel& m, const MemorySource& src, uint32_t prot,
                      std::optional<uint64_t> fixed);

// Removes the model's areas inside r after a successful unmap, checking that
// every access let go of its pins there.
void unmap_model(IoasModel& m, const IovaRange& r);

// Accesses and devices (access_ops.cpp).
void op_access_create(Reader& in);
void op_pin(Reader& in);
void op_unpin(Reader& in);
void op_access_rw(Reader& in);
void op_dma(Reader& in);
void op_translate(Reader& in);
void op_take_faults(Reader& in);
void op_pin_pages(Reader& in);
void op_unpin_pages(Reader& in);

// The dirty log (dirty_ops.cpp).
void op_dirty(Reader& in);

// A concurrent round: 2 or 3 threads at once (concurrent_ops.cpp).
void op_round(Reader& in);

void run_op(Op op, Reader& in);

}  // namespace iomm::fuzz::ioas_sequence
