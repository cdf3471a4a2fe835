// Translation of random IOVAs over 1,048,576 single-page mappings.
//
// Setup (once, static): one 4 GiB simulated source; 1M 4 KiB slices of it
// mapped at every other page from kBase (IOVA of mapping i = kBase + 2*i*4K),
// so every slice is its own mapping and its own 4 KiB leaf, and the radix walk
// goes all the way down. The SoftDomain is attached before the maps, so each
// map fills the page table. The IOAS allows exactly 1M mappings.
//
// Lookups over the *same* pre-generated IOVA sequence, each iteration a batch
// of kBatch lookups:
// - iomm:          iomm::TranslationCache::translate (the IOTLB in front of
//                  the domain; one cache for every row, as one thread would
//                  keep) under one iomm::RcuReadGuard per batch
// - iomm_no_iotlb: SoftDomain::translate of the same domain, the same way:
//                  every lookup walks (the baseline of the IOTLB's cost on
//                  misses)
// - std_map:       std::map<iova, address>, upper_bound then step back
// - flat_radix:    std::vector<uint64_t> indexed by (iova - kBase) >> 12 over
//                  the used IOVA span (2M slots, 16 MiB), 0 = not present
// Two sequences of 1M IOVAs (random byte within the page):
// - translate_1M:    random mappings of all 1M (nearly every lookup misses
//                    the IOTLB)
// - translate_hot64: random among 64 mappings picked at random from the 1M
//                    (a hot working set: the IOTLB holds it)
// All return the same address (checked over each whole sequence once in
// setup, and every result feeds a checksum compared at the end of each run).
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "bench_util.hpp"
#include "domain/page_table.hpp"  // internal: diagnostic variant only
#include "domain/soft_domain_impl.hpp"
#include "iomm/domain.hpp"
#include "iomm/ioas.hpp"
#include "iomm/rcu.hpp"
#include "iomm/source.hpp"
#include "iomm/translation_cache.hpp"

using namespace iomm_bench;

namespace {

constexpr uint64_t kMappings = 1ULL << 20;
constexpr uint64_t kPage = 4 * KiB;
constexpr uint64_t kBase = 4 * GiB;              // first IOVA
constexpr uint64_t kStride = 2 * kPage;          // every other page
constexpr uint64_t kSpan = kMappings * kStride;  // used IOVA span (8 GiB)
constexpr size_t kSequence = 1U << 20;           // random IOVAs
constexpr size_t kBatch = 4096;                  // lookups per iteration
constexpr size_t kScatter = 64;                  // IOVAs per translate_many

constexpr uint64_t kHotPages = 64;

struct Sequence {
  std::vector<uint64_t> iovas;
  uint64_t expected_sum = 0;  // sum of correct addresses over the sequence
};

struct TranslateFixture {
  std::string error;
  std::shared_ptr<iomm::Ioas> ioas;
  std::shared_ptr<iomm::SoftDomain> domain;
  std::unique_ptr<iomm::TranslationCache> cache;
  uint64_t source_base = 0;  // address translate() returns for offset 0
  Sequence all;              // random over all 1M mappings
  Sequence hot;              // random over kHotPages of them
  std::map<uint64_t, uint64_t> tree;
  std::vector<uint64_t> flat;
  double setup_seconds = 0;
};

uint64_t expected_address(const TranslateFixture& f, uint64_t iova) {
  const uint64_t rel = iova - kBase;
  return f.source_base + (rel / kStride) * kPage + (rel % kPage);
}

std::unique_ptr<TranslateFixture> build() {
  auto f = std::make_unique<TranslateFixture>();
  const auto t0 = std::chrono::steady_clock::now();
  iomm::IoasOptions opt;
  opt.max_mappings = static_cast<uint32_t>(kMappings);
  DomainSetup setup = ioas_with_domain(opt);
  if (!setup.error.empty()) {
    f->error = setup.error + " (max_mappings=1M)";
    return f;
  }
  f->ioas = setup.ioas;
  f->domain = setup.domain;
  {
    auto cache = iomm::TranslationCache::create(f->domain);
    if (!cache) {
      f->error = describe("TranslationCache::create", cache.error());
      return f;
    }
    f->cache = std::move(cache).value();
  }
  auto src = iomm::MemorySource::simulated(kMappings * kPage);
  if (!src) {
    f->error = describe("MemorySource::simulated(4 GiB)", src.error());
    return f;
  }
  for (uint64_t i = 0; i < kMappings; ++i) {
    auto iova = f->ioas->map(src->slice(i * kPage, kPage), iomm::kProtRead | iomm::kProtWrite,
                             kBase + i * kStride);
    if (!iova) {
      f->error = describe(("Ioas::map of slice " + std::to_string(i)).c_str(), iova.error());
      return f;
    }
  }
  const auto t1 = std::chrono::steady_clock::now();
  {
    auto t = f->domain->translate(kBase, iomm::kProtRead);
    if (!t) {
      f->error = describe("SoftDomain::translate(first mapping)", t.error());
      return f;
    }
    f->source_base = t->address;
  }
  // The unmapped odd pages must fault (spot check; drains the fault log).
  if (auto t = f->domain->translate(kBase + kPage, iomm::kProtRead); t.ok() || t.code() != EFAULT) {
    f->error = "translate of an unmapped IOVA did not fail with EFAULT";
    return f;
  }
  (void)f->domain->take_faults();

  // Baselines over the same 1M entries.
  f->flat.assign(kSpan / kPage, 0);
  for (uint64_t i = 0; i < kMappings; ++i) {
    const uint64_t iova = kBase + i * kStride;
    const uint64_t addr = f->source_base + i * kPage;
    f->tree.emplace_hint(f->tree.end(), iova, addr);
    f->flat[(iova - kBase) / kPage] = addr | 1;  // bit 0: present
  }

  // The sequences.
  std::mt19937_64 rng(20261121);
  f->all.iovas.resize(kSequence);
  for (auto& v : f->all.iovas) {
    const uint64_t i = rng() % kMappings;
    v = kBase + i * kStride + (rng() % kPage);
  }
  std::vector<uint64_t> hot(kHotPages);
  for (auto& i : hot) i = rng() % kMappings;
  f->hot.iovas.resize(kSequence);
  for (auto& v : f->hot.iovas) v = kBase + hot[rng() % kHotPages] * kStride + (rng() % kPage);

  // Full correctness check of the walk and of the cache over both
  // sequences, plus the checksums.
  for (Sequence* seq : {&f->all, &f->hot}) {
    iomm::RcuReadGuard guard;
    for (uint64_t iova : seq->iovas) {
      const uint64_t want = expected_address(*f, iova);
      for (bool cached : {false, true}) {
        auto t = cached ? f->cache->translate(iova, iomm::kProtRead)
                        : f->domain->translate(iova, iomm::kProtRead);
        if (!t || t->address != want || t->leaf_size != kPage) {
          char buf[200];
          std::snprintf(buf, sizeof buf, "translate(0x%llx) gave %s 0x%llx leaf %llu, want 0x%llx",
                        static_cast<unsigned long long>(iova),
                        t ? "ok" : t.error().describe().c_str(),
                        t ? static_cast<unsigned long long>(t->address) : 0ULL,
                        t ? static_cast<unsigned long long>(t->leaf_size) : 0ULL,
                        static_cast<unsigned long long>(want));
          f->error = buf;
          return f;
        }
      }
      seq->expected_sum += want;
    }
    // And the batch translations of both, in scatter lists.
    std::vector<uint64_t> out(seq->iovas.size());
    for (bool cached : {false, true}) {
      for (size_t first = 0; first < seq->iovas.size(); first += kScatter) {
        const std::span<const uint64_t> iovas(&seq->iovas[first], kScatter);
        const std::span<uint64_t> addresses(&out[first], kScatter);
        const iomm::BatchResult r =
            cached ? f->cache->translate_many(iovas, iomm::kProtRead, addresses)
                   : f->domain->translate_many(iovas, iomm::kProtRead, addresses);
        if (!r.ok() || r.translated != kScatter) {
          f->error = "translate_many failed: " + r.status.error().describe();
          return f;
        }
      }
      for (size_t i = 0; i < out.size(); ++i) {
        if (out[i] != expected_address(*f, seq->iovas[i])) {
          f->error = std::string("translate_many gave a wrong address") +
                     (cached ? " (cache)" : " (domain)");
          return f;
        }
      }
    }
  }
  const auto c = f->domain->counters();
  if (c.leaves_4k != kMappings) {
    f->error = "domain has " + std::to_string(c.leaves_4k) + " 4 KiB leaves, expected 1M";
    return f;
  }
  f->setup_seconds = std::chrono::duration<double>(t1 - t0).count();
  std::fprintf(
      stderr, "translate_bench setup: 1M maps with a domain attached in %.2f s; %llu table pages\n",
      f->setup_seconds, static_cast<unsigned long long>(c.table_pages));
  return f;
}

std::unique_ptr<TranslateFixture> g_fixture;

TranslateFixture& fixture() {
  if (!g_fixture) g_fixture = build();
  return *g_fixture;
}

// Runs batches over the sequence, summing the addresses; verifies the sum
// whenever the sequence wraps.
//
// Dependent mode (Arg 1): each IOVA gets `dep` added, where dep is bit 63 of
// the previous result (always 0 here: addresses are below 2^63) so the
// sequence is unchanged but every lookup waits for the one before: pure
// latency, no overlap of cache misses across lookups. Independent mode
// (Arg 0) is throughput: the CPU may overlap misses of consecutive lookups.
template <typename Lookup>
void run(benchmark::State& state, Sequence TranslateFixture::*which, Lookup lookup) {
  TranslateFixture& f = fixture();
  if (!f.error.empty()) return fail(state, f.error);
  const Sequence& seq = f.*which;
  size_t pos = 0;
  uint64_t sum = 0;
  for (auto _ : state) {
    const uint64_t* iovas = &seq.iovas[pos];
    const bool ok = state.range(0) != 0 ? lookup(f, iovas, kBatch, &sum, std::true_type{})
                                        : lookup(f, iovas, kBatch, &sum, std::false_type{});
    if (!ok) return fail(state, "lookup miss");
    pos += kBatch;
    if (pos == kSequence) {
      if (sum != seq.expected_sum) return fail(state, "checksum mismatch: wrong translations");
      pos = 0;
      sum = 0;
    }
  }
  benchmark::DoNotOptimize(sum);
  state.SetLabel(state.range(0) != 0 ? "dependent" : "independent");
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * kBatch));
  state.counters["ns_per_lookup"] =
      benchmark::Counter(static_cast<double>(state.iterations() * kBatch),
                         benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

// Sequence TranslateFixture::* chosen by the registration below.
using SequencePtr = Sequence TranslateFixture::*;

// translate(translator, iova), where translator is what the caller holds:
// the cache or the domain.
template <typename Translator, typename Translate>
void BM_iomm(benchmark::State& state, SequencePtr which, Translator TranslateFixture::*translator,
             Translate translate) {
  run(state, which,
      [translator, translate](TranslateFixture& f, const uint64_t* iovas, size_t n, uint64_t* sum,
                              auto dependent) {
        auto& through = *(f.*translator);
        iomm::RcuReadGuard guard;
        uint64_t s = 0;
        uint64_t dep = 0;
        for (size_t i = 0; i < n; ++i) {
          auto t = translate(through, iovas[i] + dep);
          if (!t) return false;
          s += t->address;
          if constexpr (decltype(dependent)::value) dep = t->address >> 63;
        }
        *sum += s;
        return true;
      });
}

void BM_std_map(benchmark::State& state, SequencePtr which) {
  run(state, which,
      [](TranslateFixture& f, const uint64_t* iovas, size_t n, uint64_t* sum, auto dependent) {
        const auto& m = f.tree;
        uint64_t s = 0;
        uint64_t dep = 0;
        for (size_t i = 0; i < n; ++i) {
          const uint64_t iova = iovas[i] + dep;
          auto it = m.upper_bound(iova);
          if (it == m.begin()) return false;
          --it;
          const uint64_t off = iova - it->first;
          if (off >= kPage) return false;
          s += it->second + off;
          if constexpr (decltype(dependent)::value) dep = it->second >> 63;
        }
        *sum += s;
        return true;
      });
}

void BM_flat_radix(benchmark::State& state, SequencePtr which) {
  run(state, which,
      [](TranslateFixture& f, const uint64_t* iovas, size_t n, uint64_t* sum, auto dependent) {
        const uint64_t* table = f.flat.data();
        const uint64_t slots = f.flat.size();
        uint64_t s = 0;
        uint64_t dep = 0;
        for (size_t i = 0; i < n; ++i) {
          const uint64_t iova = iovas[i] + dep;
          const uint64_t slot = (iova - kBase) >> 12;
          if (slot >= slots) return false;
          const uint64_t e = table[slot];
          if ((e & 1) == 0) return false;
          s += (e & ~(kPage - 1)) + (iova & (kPage - 1));
          if constexpr (decltype(dependent)::value) dep = e >> 63;
        }
        *sum += s;
        return true;
      });
}

// Diagnostic: the internal radix walk alone (PageTable::lookup), without the
// public translate() wrapper (nested RCU guard calls into liburcu-bp, access
// and aperture checks, Result<Translation> construction). Not a target.
void BM_pagetable_lookup(benchmark::State& state, SequencePtr which) {
  run(state, which,
      [](TranslateFixture& f, const uint64_t* iovas, size_t n, uint64_t* sum, auto dependent) {
        const iomm::domain::PageTable& pt = iomm::domain::page_table_of(*f.domain);
        iomm::RcuReadGuard guard;
        uint64_t s = 0;
        uint64_t dep = 0;
        for (size_t i = 0; i < n; ++i) {
          iomm::domain::Leaf leaf;
          if (!pt.lookup(iovas[i] + dep, &leaf)) return false;
          s += leaf.address;
          if constexpr (decltype(dependent)::value) dep = leaf.address >> 63;
        }
        *sum += s;
        return true;
      });
}

// Batch rows (no dependent mode: a batch's lookups are independent by
// definition). Each iteration translates the same kBatch IOVAs as the rows
// above, as kBatch / kScatter batches of kScatter, as a DMA engine
// translates a scatter list: every variant writes the kScatter addresses to
// an array, and the sum of that array is the checksum.

template <typename Translate>
void run_batch(benchmark::State& state, SequencePtr which, Translate translate) {
  run(state, which,
      [translate](TranslateFixture& f, const uint64_t* iovas, size_t n, uint64_t* sum,
                  auto /*dependent*/) {
        uint64_t out[kScatter];
        uint64_t s = 0;
        for (size_t first = 0; first < n; first += kScatter) {
          if (!translate(f, std::span<const uint64_t>(iovas + first, kScatter), out)) return false;
          for (uint64_t address : out) s += address;
        }
        *sum += s;
        return true;
      });
}

// translate_many of the cache or the domain, under one RcuReadGuard per
// kBatch lookups as the single-lookup rows.
template <typename Translator>
void BM_iomm_batch(benchmark::State& state, SequencePtr which,
                   Translator TranslateFixture::*translator) {
  run(state, which,
      [translator](TranslateFixture& f, const uint64_t* iovas, size_t n, uint64_t* sum,
                   auto /*dependent*/) {
        auto& through = *(f.*translator);
        iomm::RcuReadGuard guard;
        uint64_t out[kScatter];
        uint64_t s = 0;
        for (size_t first = 0; first < n; first += kScatter) {
          const iomm::BatchResult r = through.translate_many(
              std::span<const uint64_t>(iovas + first, kScatter), iomm::kProtRead, out);
          if (!r.ok()) return false;
          for (uint64_t address : out) s += address;
        }
        *sum += s;
        return true;
      });
}

void BM_std_map_batch(benchmark::State& state, SequencePtr which) {
  run_batch(state, which, [](TranslateFixture& f, std::span<const uint64_t> iovas, uint64_t* out) {
    const auto& m = f.tree;
    for (size_t i = 0; i < iovas.size(); ++i) {
      const uint64_t iova = iovas[i];
      auto it = m.upper_bound(iova);
      if (it == m.begin()) return false;
      --it;
      const uint64_t off = iova - it->first;
      if (off >= kPage) return false;
      out[i] = it->second + off;
    }
    return true;
  });
}

void BM_flat_radix_batch(benchmark::State& state, SequencePtr which) {
  run_batch(state, which, [](TranslateFixture& f, std::span<const uint64_t> iovas, uint64_t* out) {
    const uint64_t* table = f.flat.data();
    const uint64_t slots = f.flat.size();
    for (size_t i = 0; i < iovas.size(); ++i) {
      const uint64_t iova = iovas[i];
      const uint64_t slot = (iova - kBase) >> 12;
      if (slot >= slots) return false;
      const uint64_t e = table[slot];
      if ((e & 1) == 0) return false;
      out[i] = (e & ~(kPage - 1)) + (iova & (kPage - 1));
    }
    return true;
  });
}

void register_all() {
  const std::pair<const char*, SequencePtr> sequences[] = {
      {"translate_1M/", &TranslateFixture::all}, {"translate_hot64/", &TranslateFixture::hot}};
  for (const auto& entry : sequences) {
    const SequencePtr which = entry.second;
    auto reg = [prefix = std::string(entry.first)](const char* name, auto fn) {
      benchmark::RegisterBenchmark((prefix + name).c_str(), fn)
          ->ArgName("dep")
          ->Arg(0)
          ->Arg(1)
          ->Unit(benchmark::kMicrosecond);
    };
    reg("iomm", [which](benchmark::State& s) {
      BM_iomm(s, which, &TranslateFixture::cache, [](iomm::TranslationCache& c, uint64_t iova) {
        return c.translate(iova, iomm::kProtRead);
      });
    });
    reg("iomm_no_iotlb", [which](benchmark::State& s) {
      BM_iomm(s, which, &TranslateFixture::domain, [](iomm::SoftDomain& d, uint64_t iova) {
        return d.translate(iova, iomm::kProtRead);
      });
    });
    reg("std_map", [which](benchmark::State& s) { BM_std_map(s, which); });
    reg("flat_radix", [which](benchmark::State& s) { BM_flat_radix(s, which); });
    reg("diag_pagetable_lookup", [which](benchmark::State& s) { BM_pagetable_lookup(s, which); });
    auto reg_batch = [prefix = std::string(entry.first)](const char* name, auto fn) {
      benchmark::RegisterBenchmark((prefix + name).c_str(), fn)
          ->Arg(0)
          ->Unit(benchmark::kMicrosecond);
    };
    reg_batch("batch_iomm",
              [which](benchmark::State& s) { BM_iomm_batch(s, which, &TranslateFixture::cache); });
    reg_batch("batch_iomm_no_iotlb",
              [which](benchmark::State& s) { BM_iomm_batch(s, which, &TranslateFixture::domain); });
    reg_batch("batch_std_map", [which](benchmark::State& s) { BM_std_map_batch(s, which); });
    reg_batch("batch_flat_radix", [which](benchmark::State& s) { BM_flat_radix_batch(s, which); });
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  g_fixture.reset();  // tears down 1M mappings before static destruction
  return 0;
}
