// The oracle of the IOAS sequence fuzzer: what the model predicts (page
// runs, coverage walks, host bytes) and check_all(), which compares every
// IOAS, domain, access and counter with the model after each step.
#pragma once

#include "ioas_sequence/model.hpp"

namespace iomm::fuzz::ioas_sequence {

// Checks.

inline int g_last_code = -1;  // errno of the op's main library call (0 = success, -1 = none made)

template <typename R>
R note(R r) {
  g_last_code = r.code();
  return r;
}

std::optional<IovaRange> range_of(uint64_t iova, uint64_t len);

bool any_overlap(const std::vector<IovaRange>& v, const IovaRange& r);

void check_translation(DomainModel& d, uint64_t iova, uint32_t access);

void check_all();

// Checks a newly created run of areas [iova, iova + total) against the model's
// placement rules, before it is added.
void check_placement(const IoasModel& m, uint64_t iova, const std::vector<AreaModel>& added,
                     std::optional<uint64_t> fixed);

// Which errno the coverage walk of an access pin/rw gives (0 = covered).
// Mirrors the contract: a hole is ENOENT, a mapping whose host address is
// invalid (live update) EBUSY, a mapping without the prot is EPERM,
// simulated memory is ENXIO for rw.
int walk(const IoasModel& m, const IovaRange& r, uint32_t need, bool rw);

// The errno pinning `areas` for a domain gives, in order, each charged to
// its owner and then made resident, given the pins the model holds now:
// ENOMEM where an owner's charge would grow past its limit, EFAULT where the
// memory cannot be made resident (user memory PROT_NONE, or read-only for a
// writable mapping); 0 if every pin succeeds.
int predict_pins(const std::vector<AreaModel>& areas);

// Whether an access read (or write) of r in m touches user memory that
// cannot be read (PROT_NONE) or written (read-only or PROT_NONE): the only
// memory in the fixtures that gives EFAULT.
bool user_memory_faults(const IoasModel& m, const IovaRange& r, bool write);

void check_host_bytes(const IoasModel& m, uint64_t iova, const uint8_t* buf, uint64_t len,
                      const char* what);

}  // namespace iomm::fuzz::ioas_sequence
