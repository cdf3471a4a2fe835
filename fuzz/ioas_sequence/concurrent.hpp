// The concurrent round of the IOAS sequence fuzzer: its fixture (per-lane
// IOVA windows and backing slices, a shared window for the conflicting
// pairs), the per-lane shadow model and the conflicting pairs. The round is
// in concurrent_ops.cpp (op_round), the pairs in conflict_ops.cpp.
//
// A lane (one thread) works alone in its window of one IOAS, on memory no
// other lane maps, so the model predicts each of its calls exactly, as for a
// single-threaded step; only the memlock charge and the mapping limit are
// shared with the other lanes (a tight round, see Plan). A conflicting pair
// acts on the shared window only: its allowed outcomes are the results of
// the two orders and, where the contract names one, of the overlap (EBUSY of
// a mapping being created, EINVAL of a range being unmapped).
#pragma once

#include <string>

#include "ioas_sequence/model.hpp"

namespace iomm::fuzz::ioas_sequence {

constexpr int kMaxLanes = 3;

constexpr int kMaxSlots = 4;

constexpr int kSharedRegion = kMaxLanes;  // region index of the shared window

// Lane t works in region t = [kWindowBase + t * kWindowSize, +kWindowSize);
// the shared window is the next region. Inside every aperture the domain
// configs offer, outside their reserved regions, away from the IOVA table.
constexpr uint64_t kWindowBase = 0x1200000;

constexpr uint64_t kWindowSize = 0x200000;

inline IovaRange region(int r) {
  const uint64_t start = kWindowBase + static_cast<uint64_t>(r) * kWindowSize;
  return {start, start + kWindowSize - 1};
}

// Backing of lane t: [base + t * size, +size) of the read-write memfd, of
// the read-write user memory and of the second simulated source. The shared
// window maps the memfd from kSharedFileBase.
constexpr uint64_t kLaneFileBase = 512 * kKiB;

constexpr uint64_t kLaneFileSize = 128 * kKiB;

constexpr uint64_t kSharedFileBase = kLaneFileBase + kMaxLanes * kLaneFileSize;  // 896 KiB

constexpr uint64_t kLaneUserBase = 128 * kKiB;

constexpr uint64_t kLaneUserSize = 32 * kKiB;

constexpr uint64_t kLaneSimBase = 256 * kMiB;

constexpr uint64_t kLaneSimSize = 64 * kMiB;

constexpr uint64_t kLaneRwMax = 64 * kKiB;  // longest lane read/write/DMA

enum LaneOpKind : uint8_t { kLMap, kLUnmap, kLPin, kLUnpin, kLRw, kLDma, kLDirty, kLaneOpCount };

inline const char* const kLaneOpNames[] = {"map", "unmap", "pin", "unpin", "rw", "dma", "dirty"};

static_assert(std::size(kLaneOpNames) == kLaneOpCount);

// One operation of a lane: an opcode and 4 argument bytes, read before the
// threads start and interpreted against the lane's model when it runs.
struct LaneOp {
  LaneOpKind kind = kLMap;
  uint8_t a = 0, b = 0, c = 0, d = 0;
};

// Page counts of lane maps and pins (bounded, for the round's budget).
constexpr uint64_t kLaneNpages[] = {1, 2, 3, 4, 8, 16, 32, 64};

inline uint64_t lane_npages(uint8_t b) { return kLaneNpages[b % std::size(kLaneNpages)]; }

// What the round may do to the budgets it shares: upper bounds of the bytes
// it may pin and of the mappings it may add, from its decoded operations. A
// round is tight if they could pass an owner's memlock limit or the IOAS's
// mapping limit: then which lane's pinning call gets ENOMEM, and which map
// ENOSPC, depends on the interleaving. Only then are those errnos accepted
// in place of the predicted result of a pinning call.
struct Plan {
  IoasModel* m = nullptr;
  int lanes = 2;
  int slots = 1;
  bool tight_charge = false;
  bool tight_maps = false;
};

// A lane's shadow model: the areas overlapping its window and the window's
// dirty pages, copied from the IOAS's model before the round and merged back
// after it; its own access (created for the round, destroyed after it); the
// faults its DMA recorded, per domain.
struct Lane {
  int id = 0;
  IovaRange window{};
  AreaMap areas;
  std::set<uint64_t> dirty;
  std::unique_ptr<AccessModel> access;
  std::map<DomainModel*, uint64_t> faults;
  bool bytes_checked = true;  // no other mapping of the IOAS aliases the lane's memory
  std::vector<uint8_t> buf = std::vector<uint8_t>(kLaneRwMax);
  std::vector<LaneOp> ops;  // per slot; lanes 0 and 1 run the conflict at its slot
  std::string trace;        // outcomes, for the step's trace line
  bool racy = false;        // a tight call ran: what follows may differ from run to run
};

enum ConflictKind : uint8_t {
  kNoConflict,
  kUnmapVsPin,    // lane 0 unmaps an area, lane 1 pins it
  kMapVsUnmap,    // lane 0 maps a fixed range, lane 1 unmaps the same range
  kMapVsMap,      // both map the same fixed range, from different memory
  kWriteVsDirty,  // lane 0 writes an area (DMA or access), lane 1 reads the dirty log
  kUnmapVsRw,     // lane 0 unmaps an area, lane 1 reads or writes it
  kUnmapVsUnmap,  // both unmap the same area
  kConflictCount,
};

inline const char* const kConflictNames[] = {"none",        "unmap/pin", "map/unmap",  "map/map",
                                             "write/dirty", "unmap/rw",  "unmap/unmap"};

static_assert(std::size(kConflictNames) == kConflictCount);

// A conflicting pair: lanes 0 and 1 run it at the same slot. Everything it
// needs is predicted before the threads start (from the model as it is),
// the results are written by the two lanes and checked after they joined.
struct Conflict {
  ConflictKind kind = kNoConflict;
  IoasModel* m = nullptr;
  int slot = 0;
  uint8_t a = 0, b = 0, c = 0;
  const char* skipped = nullptr;  // why it does not run (decided before the round)
  IovaRange range{};              // the range both calls work on
  std::optional<AreaModel> target;
  std::optional<MemorySource> src[2];
  uint32_t prot[2] = {0, 0};
  uint64_t len = 0;
  bool allow_empty = false, dma = false, write = false, peek = false;
  int pred[2] = {0, 0};  // each call's result alone, on the state before the round
  uint64_t pred_bytes = 0;
  int pred_after_unmap = 0;              // kMapVsUnmap: the map's result once the unmap went first
  bool marks = false;                    // kWriteVsDirty: the write marks its pages
  bool fault = false;                    // kWriteVsDirty: the DMA write records a fault
  uint64_t first_page = 0, npages = 0;   // kWriteVsDirty: the pages read
  std::set<uint64_t> pre_dirty, pinned;  // kWriteVsDirty: of those, before the round
  int got[2] = {-1, -1};
  uint64_t bytes[2] = {0, 0};  // what each lane's unmap returned
  std::vector<uint64_t> bitmap;
};

// Conflicting pairs (conflict_ops.cpp): decides whether it can run and
// predicts it before the round; runs lane i's call; checks the outcome after
// the round, brings the model to it and settles the shared window so that
// the state after the round does not depend on the interleaving.
void plan_conflict(Conflict& k, const Plan& plan, const Lane* lanes);
void run_conflict(Conflict& k, Lane& lane, int i);
void resolve_conflict(Conflict& k, const Plan& plan, Lane* lanes);

// Prints how often each pair ended in each outcome (IOMM_FUZZ_STATS=1).
void print_conflict_stats();

// The errno and bytes of unmap (or unmap_range_allow_empty) of [iova, +len)
// over the areas.
int predict_unmap(const AreaMap& areas, uint64_t iova, uint64_t len, bool allow_empty,
                  uint64_t* bytes);

// The errno of a DMA of [iova, +len) (len > 0, no wrap) through d over the
// areas: mapping by mapping aperture, presence, permission (each a fault,
// *fault set), then ENXIO if any of it is simulated memory.
int predict_dma(const DomainModel& d, const AreaMap& areas, uint64_t iova, uint64_t len,
                uint32_t need, bool* fault);

// Whether an access of m that no lane owns holds a pin overlapping r (read
// under its lock: a lane's unmap runs its callback on the lane's thread).
bool world_pins_overlap(const IoasModel& m, const IovaRange& r);

// The page numbers in [first, first + n) that the accesses of m, and `extra`
// (a lane's own), hold pinned, read under their locks.
std::set<uint64_t> pinned_pages(const IoasModel& m, AccessModel* extra, uint64_t first, uint64_t n);

}  // namespace iomm::fuzz::ioas_sequence
