// Sequence fuzzer for the IOAS API (issue #4).
//
// Each input is a program: a 4-byte header (the two IOAS's options and the
// two configured memlock limits) followed by operations, one opcode byte and
// its argument bytes each (see the Op enum and the op_* functions; bytes past
// the end read as 0). The program drives two IOAS slots, two SoftDomain slots
// and two Access slots over memory from a memfd, a read-only memfd, simulated
// sources and this process's memory (read-write, read-only and PROT_NONE).
//
// A shadow model mirrors every object. After each step the library must agree
// with it exactly:
// - every error is one the call's contract lists, and where the model can
//   tell it is exactly the errno the model predicts: every call except the
//   IOVA allocation of map/copy_from and a pin or pin_pages that pins new
//   pages (fuzz/README.md lists what is still loose); pinning with a domain
//   gives ENOMEM exactly where a charge would pass its limit and EFAULT
//   exactly where the memory is bad; access rw gives EFAULT exactly where
//   the model says the user memory is bad;
// - page pins keep per-page counts; the dirty log's bitmap equals the pages
//   the model wrote since the last switch or read plus the pages accesses
//   hold pinned;
// - a failed call changed nothing (mappings, counters and pins still equal the
//   model, which a failure does not touch);
// - mappings() and counters() of each IOAS, pin counts of each access, the
//   mapped bytes and fault counts of each domain;
// - the process's pinned bytes (real and simulated) equal the distinct pages
//   of (mappings of IOAS with a domain) U (access pins), per backing object;
//   each owner's charge equals the distinct pages it pays for; VmLck equals
//   the real pinned bytes; a charge that grew is within the owner's limit;
// - translate() of probe IOVAs (area edges and their neighbours) in every
//   attached domain points exactly at the backing of the mapped area, or
//   faults when nothing is mapped there.
// At the end of the input everything is torn down and every counter and
// VmLck must be zero. Any violation aborts, which libFuzzer records as a crash.
//
// One operation, `round`, runs 2 or 3 threads at once, each in its own IOVA
// window and predicted exactly, plus a conflicting pair on a shared window
// checked against the outcomes of both orders (concurrent.hpp; fuzz/README.md,
// "Concurrent rounds").
//
// The parts (fuzz/ioas_sequence/): model.* (the fixtures and the shadow
// model), generators.* (argument pickers), oracle.* (predictions and the check
// after every step), operations.hpp with address_space_ops.cpp,
// access_ops.cpp and dirty_ops.cpp (one function per operation) and
// operations.cpp (the dispatch), concurrent.hpp with concurrent_ops.cpp and
// conflict_ops.cpp (the round). This file holds the input loop and the statistics.
#include <cstdio>
#include <cstdlib>
#include <map>

#include "ioas_sequence/concurrent.hpp"
#include "ioas_sequence/model.hpp"
#include "ioas_sequence/operations.hpp"
#include "ioas_sequence/oracle.hpp"

namespace {

using namespace iomm;
using namespace iomm::fuzz::ioas_sequence;
using iomm::fuzz::Reader;

// Outcome statistics per operation, printed at exit with IOMM_FUZZ_STATS=1
// (to see that the corpus reaches deep states, not only argument errors).
struct OpStats {
  uint64_t runs = 0;
  uint64_t ok = 0;
  std::map<int, uint64_t> errors;
};
OpStats g_stats[kOpCount];

bool g_trace = false;  // IOMM_FUZZ_TRACE=1: print each step and its outcome

void print_stats() {
  for (int i = 0; i < kOpCount; ++i) {
    std::fprintf(stderr, "%-20s runs %8lu ok %8lu", kOpNames[i], g_stats[i].runs, g_stats[i].ok);
    for (const auto& [code, n] : g_stats[i].errors)
      std::fprintf(stderr, " %s:%lu", errno_name(code), n);
    std::fprintf(stderr, "\n");
  }
  print_conflict_stats();
}

void check_clean(const char* when) {
  const Counters c = counters();
  FUZZ_CHECK(c.pinned_bytes == 0 && c.simulated_pinned_bytes == 0 && c.charged_bytes == 0 &&
                 c.vmlck_bytes == 0 && process_vmlck_bytes() == 0,
             "%s: pinned %#lx, simulated %#lx, charged %#lx, VmLck %#lx", when, c.pinned_bytes,
             c.simulated_pinned_bytes, c.charged_bytes, c.vmlck_bytes);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  setup_fixtures();
  if (const char* e = std::getenv("IOMM_FUZZ_STATS"); e != nullptr && *e == '1') {
    std::atexit(print_stats);
  }
  if (const char* e = std::getenv("IOMM_FUZZ_TRACE"); e != nullptr && *e == '1') g_trace = true;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (fx == nullptr) setup_fixtures();
  iomm::fuzz::trace_input_start(g_trace);
  Reader in(data, size);
  iomm::fuzz::g_step_index = -1;
  iomm::fuzz::g_step_name = "setup";
  check_clean("before the input");

  w = new World();
  g_raced = false;
  const uint8_t h0 = in.u8();
  const uint8_t h1 = in.u8();
  w->limit[kProcessOwner] = kLimits[in.u8() % std::size(kLimits)];
  w->limit[kUserOwner] = kLimits[in.u8() % std::size(kLimits)];
  FUZZ_CHECK(set_memlock_limit(AccountMode::per_process, 0, w->limit[kProcessOwner]).ok() &&
                 set_memlock_limit(AccountMode::per_user, 0, w->limit[kUserOwner]).ok(),
             "set_memlock_limit failed");
  w->ioas[0] = create_ioas(h0);
  w->ioas[1] = create_ioas(h1);

  for (size_t step = 0; step < kMaxSteps && !in.empty(); ++step) {
    const Op op = static_cast<Op>(in.u8() % kOpCount);
    iomm::fuzz::g_step_index = static_cast<int>(step);
    iomm::fuzz::g_step_name = kOpNames[op];
    g_last_code = -1;
    g_step_detail.clear();
    const bool raced_before = g_raced;
    run_op(op, in);
    ++g_stats[op].runs;
    if (g_last_code == 0) ++g_stats[op].ok;
    if (g_last_code > 0) ++g_stats[op].errors[g_last_code];
    if (g_trace && !raced_before) {
      std::fprintf(stderr, "step %2zu %-18s -> %s%s%s\n", step, kOpNames[op],
                   g_last_code < 0    ? "(no call)"
                   : g_last_code == 0 ? "ok"
                                      : errno_name(g_last_code),
                   g_step_detail.empty() ? "" : " ", g_step_detail.c_str());
      if (g_raced) {
        std::fprintf(stderr,
                     "step -- the rest follows a tight round, whose results may differ from run "
                     "to run: checked, not traced\n");
      }
    }
    check_all();
  }

  // Teardown: accesses, then address spaces, then domains.
  iomm::fuzz::g_step_name = "teardown";
  for (auto& a : w->access) a.reset();
  for (auto& m : w->ioas) m.reset();
  for (auto& d : w->domain) {
    if (d) {
      FUZZ_CHECK(d->attached == nullptr, "domain still attached after its IOAS died");
      FUZZ_CHECK(d->domain->counters().mapped_bytes == 0, "detached domain still maps bytes");
    }
    d.reset();
  }
  delete w;
  w = nullptr;
  check_clean("after teardown");
  return 0;
}