// The oracle of the IOAS sequence fuzzer: what the model predicts (page
// runs, coverage walks, host bytes) and check_all(), which compares every
// IOAS, domain, access and counter with the model after each step.
#pragma once

#include "ioas_sequence/model.hpp"

namespace iomm::fuzz::ioas_sequence {

// Checks.

// errno of the op's main library call (0 = success, -1 = none made); per
// thread, as the lanes of a concurrent round make calls of their own.
inline thread_local int g_last_code = -1;

// The outcomes of a concurrent round, printed after its step's trace line.
inline std::string g_step_detail;

// Set by a concurrent round a call of which may have had another result in
// another run (a tight round): from there on the trace prints no results,
// and the steps that follow may read the input differently.
inline bool g_raced = false;

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
int walk(const AreaMap& areas, const IovaRange& r, uint32_t need, bool rw);
inline int walk(const IoasModel& m, const IovaRange& r, uint32_t need, bool rw) {
  return walk(m.areas, r, need, rw);
}

// The errno pinning `areas` for a domain gives, in order, each charged to
// its owner and then made resident, given the pins the model holds now:
// ENOMEM where an owner's charge would grow past its limit, EFAULT where the
// memory cannot be made resident (user memory PROT_NONE, or read-only for a
// writable mapping); 0 if every pin succeeds.
int predict_pins(const std::vector<AreaModel>& areas);

// Whether an access read (or write) of r in m touches user memory that
// cannot be read (PROT_NONE) or written (read-only or PROT_NONE): the only
// memory in the fixtures that gives EFAULT.
bool user_memory_faults(const AreaMap& areas, const IovaRange& r, bool write);
inline bool user_memory_faults(const IoasModel& m, const IovaRange& r, bool write) {
  return user_memory_faults(m.areas, r, write);
}

// Whether pinning all of src (for write: made resident writable) faults.
bool source_faults(const MemorySource& src, bool write);

void check_host_bytes(const AreaMap& areas, uint64_t iova, const uint8_t* buf, uint64_t len,
                      const char* what);
inline void check_host_bytes(const IoasModel& m, uint64_t iova, const uint8_t* buf, uint64_t len,
                             const char* what) {
  check_host_bytes(m.areas, iova, buf, len, what);
}

}  // namespace iomm::fuzz::ioas_sequence
