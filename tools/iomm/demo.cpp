// `iomm demo`: one guest-memory memfd taken through the life of a VM's DMA
// setup (map, attach domains, alias, DMA, mediated access, unmap), showing
// after each step what is pinned and charged and checking it against what the
// library promises.
#include <fcntl.h>
#include <linux/capability.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "commands.hpp"
#include "demo_checks.hpp"
#include "iomm/access.hpp"
#include "iomm/accounting.hpp"
#include "iomm/domain.hpp"
#include "iomm/ioas.hpp"
#include "iomm/source.hpp"
#include "output.hpp"

namespace iomm::cli {
namespace {

constexpr uint32_t kReadWrite = kProtRead | kProtWrite;
constexpr uint64_t kMinSize = 1ULL << 20;
constexpr std::string_view kSignature = "iomm demo guest memory";
constexpr uint64_t kDmaOffset = kPageSize;  // just past the signature
constexpr size_t kDmaBytes = 16 << 10;
constexpr uint64_t kAccessPinBytes = 64 << 10;
constexpr std::string_view kAccessMessage = "written through an access pin";

void expect_bytes(std::string_view counter, uint64_t actual, uint64_t expected) {
  if (actual != expected) {
    throw DemoFailure(std::string(counter) + " is " + format_bytes(actual) + " (" +
                      std::to_string(actual) + " bytes), expected " + format_bytes(expected));
  }
}

std::string hex(uint64_t value) {
  char text[24];
  std::snprintf(text, sizeof text, "0x%llx", static_cast<unsigned long long>(value));
  return text;
}

std::string range_text(const IovaRange& range) {
  return "[" + hex(range.start) + ", " + hex(range.last) + "]";
}

// Sets CAP_IPC_LOCK in this thread's effective set; returns whether it was set
// before.
bool set_ipc_lock(bool on) {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};
  if (syscall(SYS_capget, &header, data) != 0) return false;
  auto& effective = data[CAP_TO_INDEX(CAP_IPC_LOCK)].effective;
  const bool had = (effective & CAP_TO_MASK(CAP_IPC_LOCK)) != 0;
  if (had == on) return had;
  if (on) {
    effective |= CAP_TO_MASK(CAP_IPC_LOCK);
  } else {
    effective &= ~CAP_TO_MASK(CAP_IPC_LOCK);
  }
  if (syscall(SYS_capset, &header, data) != 0 && !on) {
    throw DemoFailure(std::string("cannot drop CAP_IPC_LOCK: ") + errno_text(errno));
  }
  return had;
}

// A mapping created while the thread holds CAP_IPC_LOCK is never charged (as
// in the kernel), and iomm decides that at map time. Root holds it, so the
// demo maps without it to show charges and the limit, and keeps it otherwise:
// the kernel's mlock behind each pin then ignores RLIMIT_MEMLOCK, which a
// container without CAP_SYS_RESOURCE cannot raise.
class ChargedMappingScope {
 public:
  ChargedMappingScope() : had_(set_ipc_lock(false)) {}
  ~ChargedMappingScope() {
    // Raising a capability we held cannot fail, and set_ipc_lock(true)
    // never throws; a destructor must not let anything escape regardless.
    try {
      if (had_) set_ipc_lock(true);
    } catch (...) {
    }
  }
  ChargedMappingScope(const ChargedMappingScope&) = delete;
  ChargedMappingScope& operator=(const ChargedMappingScope&) = delete;

 private:
  bool had_;
};

// Without CAP_IPC_LOCK the kernel checks its own RLIMIT_MEMLOCK on the mlock
// behind every pin, so it has to admit the whole guest memory.
void ensure_kernel_memlock_limit(uint64_t bytes) {
  rlimit limit{};
  if (getrlimit(RLIMIT_MEMLOCK, &limit) != 0) return;
  if (limit.rlim_cur == RLIM_INFINITY || limit.rlim_cur >= bytes) return;
  limit.rlim_cur = std::min<rlim_t>(bytes, limit.rlim_max);
  setrlimit(RLIMIT_MEMLOCK, &limit);
  if (limit.rlim_cur < bytes) {
    throw DemoFailure(
        "RLIMIT_MEMLOCK (at most " + format_bytes(limit.rlim_max) + ") is below the " +
        format_bytes(bytes) +
        " the demo pins; raise it (ulimit -l), run as root, or pick a smaller --size");
  }
}

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  Fd& operator=(Fd&& other) noexcept {
    std::swap(fd_, other.fd_);
    return *this;
  }
  [[nodiscard]] int get() const noexcept { return fd_; }

 private:
  int fd_ = -1;
};

// The pins an access holds. The unmap callback runs on the unmapping thread,
// so pinning-and-recording and the callback's unpinning share this lock.
struct AccessPins {
  std::mutex mu;
  Access* access = nullptr;
  std::vector<IovaRange> held;
  std::vector<IovaRange> notified;
  std::string unpin_error;

  void on_unmap(const IovaRange& range) {
    std::lock_guard lock(mu);
    notified.push_back(range);
    std::erase_if(held, [&](const IovaRange& pin) {
      if (!pin.overlaps(range)) return false;
      if (const Status st = access->unpin(pin.start, *pin.length()); !st) {
        unpin_error = st.error().describe();
        return false;
      }
      return true;
    });
  }
};

struct DomainSnapshot {
  const char* name;
  bool attached;
  DomainCounters counters;
};

// What one step left behind.
struct Snapshot {
  size_t number;
  std::string_view name;
  uint64_t mappings;
  Counters counters;
  std::vector<DomainSnapshot> domains;
  std::optional<uint64_t> access_pinned;  // nullopt before the access exists
  std::string note;
};

// "1x1G", "2x1G+3x4K", "0".
std::string leaves_text(const DomainCounters& c) {
  std::string out;
  const auto append = [&](uint64_t count, const char* size) {
    if (count == 0) return;
    if (!out.empty()) out += "+";
    out += std::to_string(count) + "x" + size;
  };
  append(c.leaves_1g, "1G");
  append(c.leaves_2m, "2M");
  append(c.leaves_4k, "4K");
  return out.empty() ? "0" : out;
}

class Reporter {
 public:
  virtual ~Reporter() = default;
  virtual void step(const Snapshot& s) = 0;
  // Called once, after the last step or after a failure.
  virtual void finish(bool ok) = 0;
};

class TableReporter : public Reporter {
 public:
  TableReporter() {
    std::printf("iomm demo (pid %d)\n\n", static_cast<int>(getpid()));
    std::printf(kRowFormat, "#", "step", "maps", "pinned", "charged", "VmLck", "leaves A",
                "leaves B", "faults", "access", "note");
  }

  void step(const Snapshot& s) override {
    std::string leaves[2] = {"-", "-"};
    uint64_t faults = 0;
    for (size_t i = 0; i < s.domains.size() && i < 2; ++i) {
      leaves[i] = leaves_text(s.domains[i].counters);
      faults += s.domains[i].counters.faults;
    }
    const std::string access = s.access_pinned ? format_bytes(*s.access_pinned) : "-";
    std::printf(kRowFormat, std::to_string(s.number).c_str(), std::string(s.name).c_str(),
                std::to_string(s.mappings).c_str(), format_bytes(s.counters.pinned_bytes).c_str(),
                format_bytes(s.counters.charged_bytes).c_str(),
                format_bytes(s.counters.vmlck_bytes).c_str(), leaves[0].c_str(), leaves[1].c_str(),
                std::to_string(faults).c_str(), access.c_str(), s.note.c_str());
    std::fflush(stdout);
  }

  void finish(bool ok) override {
    if (ok) std::printf("\nall steps checked: nothing left pinned, charged or locked\n");
  }

 private:
  static constexpr const char* kRowFormat = "%-2s %-21s %4s %9s %9s %9s %-9s %-9s %6s %8s  %s\n";
};

class JsonReporter : public Reporter {
 public:
  JsonReporter() { std::printf("["); }

  void step(const Snapshot& s) override {
    std::vector<std::string> domains;
    for (const DomainSnapshot& d : s.domains) {
      domains.push_back(JsonObject()
                            .add("name", d.name)
                            .add("attached", d.attached)
                            .add("mapped_bytes", d.counters.mapped_bytes)
                            .add("leaves_4k", d.counters.leaves_4k)
                            .add("leaves_2m", d.counters.leaves_2m)
                            .add("leaves_1g", d.counters.leaves_1g)
                            .add("faults", d.counters.faults)
                            .str());
    }
    std::vector<std::string> owners;
    for (const OwnerCounters& o : s.counters.owners) {
      owners.push_back(JsonObject()
                           .add("mode", to_string(o.mode))
                           .add("id", o.id)
                           .add("charged_bytes", o.charged_bytes)
                           .add("limit_bytes", o.limit_bytes)
                           .str());
    }
    const std::string row = JsonObject()
                                .add("step", s.number)
                                .add("name", s.name)
                                .add("mappings", s.mappings)
                                .add("pinned_bytes", s.counters.pinned_bytes)
                                .add("charged_bytes", s.counters.charged_bytes)
                                .add("vmlck_bytes", s.counters.vmlck_bytes)
                                .raw("owners", json_array(owners))
                                .raw("domains", json_array(domains))
                                .add("access_pinned_bytes", s.access_pinned)
                                .add("note", s.note)
                                .str();
    std::printf("%s\n  %s", first_ ? "" : ",", row.c_str());
    first_ = false;
    std::fflush(stdout);
  }

  void finish(bool) override { std::printf("%s]\n", first_ ? "" : "\n"); }

 private:
  bool first_ = true;
};

class Demo {
 public:
  explicit Demo(const DemoOptions& options) : options_(options) {}

  // Runs every step, reporting each; throws DemoFailure naming what failed.
  void run(Reporter& reporter) {
    struct Step {
      std::string_view name;
      std::string (Demo::*run)();
    };
    static constexpr Step kSteps[] = {
        {"create guest memory", &Demo::create_guest_memory},
        {"map (lazy)", &Demo::map_lazily},
        {"attach domain A", &Demo::attach_domain_a},
        {"attach domain B", &Demo::attach_domain_b},
        {"map again (alias)", &Demo::map_alias},
        {"DMA via A and B", &Demo::dma_through_domains},
        {"access pin", &Demo::pin_through_access},
        {"unmap first mapping", &Demo::unmap_first_mapping},
        {"unmap all, detach", &Demo::tear_down},
    };
    for (size_t i = 0; i < std::size(kSteps); ++i) {
      const Step& step = kSteps[i];
      if (i + 1 == std::size(kSteps)) hold();
      std::string note;
      try {
        note = (this->*step.run)();
      } catch (const DemoFailure& failure) {
        throw DemoFailure("step " + std::to_string(i + 1) + " (" + std::string(step.name) +
                          "): " + failure.what());
      }
      reporter.step(snapshot(i + 1, step.name, std::move(note)));
    }
  }

 private:
  std::string create_guest_memory() {
    const bool ipc_lock = set_ipc_lock(true);
    if (!ipc_lock) ensure_kernel_memlock_limit(options_.size);
    const uint64_t limit = 2 * options_.size;
    must(set_memlock_limit(AccountMode::per_process, 0, limit), "set_memlock_limit");

    memfd_ = Fd(memfd_create("iomm-demo-guest", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    if (memfd_.get() < 0) throw DemoFailure(std::string("memfd_create: ") + errno_text(errno));
    if (ftruncate(memfd_.get(), static_cast<off_t>(options_.size)) != 0 ||
        fcntl(memfd_.get(), F_ADD_SEALS, F_SEAL_SHRINK) != 0 ||
        pwrite(memfd_.get(), kSignature.data(), kSignature.size(), 0) !=
            static_cast<ssize_t>(kSignature.size())) {
      throw DemoFailure(std::string("preparing the memfd: ") + errno_text(errno));
    }
    source_ =
        must(MemorySource::from_file(memfd_.get(), 0, options_.size), "MemorySource::from_file");
    ioas_ = must(Ioas::create({.account_mode = AccountMode::per_process}), "Ioas::create");

    expect_bytes("pinned", counters().pinned_bytes, 0);
    return format_bytes(options_.size) + " memfd, per-process owner " + std::to_string(getpid()) +
           ", memlock limit " + format_bytes(limit) +
           (ipc_lock ? " (CAP_IPC_LOCK dropped while mapping)" : "");
  }

  std::string map_lazily() {
    first_iova_ = map_charged();
    const Counters c = counters();
    expect(ioas_->counters().mappings == 1, "the IOAS should hold one mapping");
    expect_bytes("pinned", c.pinned_bytes, 0);
    expect_bytes("charged", c.charged_bytes, 0);
    return "at IOVA " + hex(first_iova_) + "; nothing pinned until a domain is attached";
  }

  std::string attach_domain_a() {
    domain_a_ = must(SoftDomain::create({}), "SoftDomain::create");
    must(ioas_->attach(domain_a_), "attach domain A");
    attached_a_ = true;
    const Counters c = counters();
    expect_bytes("pinned", c.pinned_bytes, options_.size);
    expect_bytes("charged", c.charged_bytes, options_.size);
    expect(c.vmlck_bytes >= options_.size, "the kernel should count the pinned pages in VmLck");
    expect(domain_a_->counters().mapped_bytes == options_.size, "domain A should map it all");
    const std::optional<uint64_t> limit = c.owners.empty() ? std::nullopt : c.owners[0].limit_bytes;
    return "first domain pins every mapping: " + format_bytes(c.charged_bytes) + " charged of " +
           (limit ? format_bytes(*limit) : std::string("unlimited"));
  }

  std::string attach_domain_b() {
    const Counters before = counters();
    domain_b_ = must(SoftDomain::create({}), "SoftDomain::create");
    must(ioas_->attach(domain_b_), "attach domain B");
    attached_b_ = true;
    const Counters c = counters();
    expect_bytes("pinned", c.pinned_bytes, before.pinned_bytes);
    expect_bytes("charged", c.charged_bytes, before.charged_bytes);
    const DomainCounters a = domain_a_->counters();
    const DomainCounters b = domain_b_->counters();
    expect(b.mapped_bytes == options_.size && b.leaves_1g == a.leaves_1g &&
               b.leaves_2m == a.leaves_2m && b.leaves_4k == a.leaves_4k,
           "domain B should map the same leaves as domain A");
    return "no new pin or charge; B maps it with " + leaves_text(b) + " leaves";
  }

  std::string map_alias() {
    const Counters before = counters();
    second_iova_ = map_charged();
    const Counters c = counters();
    expect(ioas_->counters().mappings == 2, "the IOAS should hold two mappings");
    expect_bytes("pinned", c.pinned_bytes, before.pinned_bytes);
    expect_bytes("charged", c.charged_bytes, before.charged_bytes);
    expect(domain_a_->counters().mapped_bytes == 2 * options_.size &&
               domain_b_->counters().mapped_bytes == 2 * options_.size,
           "both domains should map both IOVA ranges");
    return "same pages at IOVA " + hex(second_iova_) + ": pinned and charged once";
  }

  std::string dma_through_domains() {
    std::string signature(kSignature.size(), '\0');
    must(domain_a_->dma_read(first_iova_, signature.data(), signature.size()),
         "dma_read of the signature via A");
    expect(signature == kSignature, "domain A does not translate to the guest memory");

    std::vector<unsigned char> pattern(kDmaBytes);
    for (size_t i = 0; i < pattern.size(); ++i)
      pattern[i] = static_cast<unsigned char>(i * 131 + 7);
    must(domain_a_->dma_write(first_iova_ + kDmaOffset, pattern.data(), pattern.size()),
         "dma_write via A");
    std::vector<unsigned char> readback(kDmaBytes);
    must(domain_b_->dma_read(second_iova_ + kDmaOffset, readback.data(), readback.size()),
         "dma_read via B");
    expect(readback == pattern, "the pattern read via B differs from what A wrote");

    // IOVA 0 is never allocated, so nothing is mapped there.
    const Status stray = domain_a_->dma_write(0, pattern.data(), kPageSize);
    expect(stray.code() == EFAULT, std::string("DMA to an unmapped IOVA gave ") +
                                       errno_name(stray.code()) + ", expected EFAULT");
    const std::vector<IommuFault> faults = domain_a_->take_faults();
    expect(
        faults.size() == 1 && faults[0].iova == 0 && faults[0].reason == FaultReason::not_present,
        "the stray DMA should be recorded as one not-present fault at IOVA 0");
    return format_bytes(kDmaBytes) + " written via A, read back via B at the alias; DMA to " +
           hex(0) + ": " + errno_name(stray.code()) + ", fault " + to_string(faults[0].reason);
  }

  std::string pin_through_access() {
    const Counters before = counters();
    access_ =
        must(Access::create(ioas_, [pins = &pins_](const IovaRange& r) { pins->on_unmap(r); }),
             "Access::create");
    const uint64_t iova = first_iova_ + (options_.size / 2 & ~(kAccessPinBytes - 1));
    std::vector<PinnedSegment> segments;
    {
      std::lock_guard lock(pins_.mu);
      pins_.access = access_.get();
      segments = must(access_->pin(iova, kAccessPinBytes, kReadWrite), "access pin");
      pins_.held.push_back(*make_range(iova, kAccessPinBytes));
    }
    expect(segments.size() == 1 && segments[0].host != nullptr,
           "the pin should be one segment with a host pointer");
    std::memcpy(segments[0].host, kAccessMessage.data(), kAccessMessage.size());
    std::string readback(kAccessMessage.size(), '\0');
    must(access_->read(iova, readback.data(), readback.size()), "access read");
    expect(readback == kAccessMessage, "access read does not see the host pointer's write");

    const Counters c = counters();
    expect_bytes("pinned", c.pinned_bytes, before.pinned_bytes);
    expect_bytes("charged", c.charged_bytes, before.charged_bytes);
    expect_bytes("access pinned", access_->pinned_bytes(), kAccessPinBytes);
    return format_bytes(kAccessPinBytes) + " at " + hex(iova) +
           " (already pinned: no new pin or charge); host write read back via the access";
  }

  std::string unmap_first_mapping() {
    const uint64_t unmapped = must(ioas_->unmap(first_iova_, options_.size), "unmap");
    expect_bytes("unmapped", unmapped, options_.size);
    std::lock_guard lock(pins_.mu);
    expect(pins_.unpin_error.empty(), "the unmap callback failed to unpin: " + pins_.unpin_error);
    expect(pins_.notified.size() == 1, "the access should be notified once");
    expect(pins_.held.empty(), "the access still records a pin");
    expect_bytes("access pinned", access_->pinned_bytes(), 0);
    const Counters c = counters();
    expect_bytes("pinned", c.pinned_bytes, options_.size);
    expect_bytes("charged", c.charged_bytes, options_.size);
    return "access notified of " + range_text(pins_.notified[0]) +
           " and unpinned; the alias keeps the pages pinned";
  }

  std::string tear_down() {
    must(ioas_->unmap_all(), "unmap_all");
    must(ioas_->detach(domain_a_), "detach domain A");
    attached_a_ = false;
    must(ioas_->detach(domain_b_), "detach domain B");
    attached_b_ = false;
    const Counters c = counters();
    expect_bytes("pinned", c.pinned_bytes, 0);
    expect_bytes("charged", c.charged_bytes, 0);
    expect_bytes("VmLck", c.vmlck_bytes, 0);
    expect(domain_a_->counters().mapped_bytes == 0 && domain_b_->counters().mapped_bytes == 0,
           "detached domains should map nothing");
    return "everything released";
  }

  uint64_t map_charged() {
    const ChargedMappingScope charged;
    return must(ioas_->map(*source_, kReadWrite), "map");
  }

  void hold() const {
    if (options_.hold_seconds == 0) return;
    std::fflush(stdout);
    std::fprintf(stderr, "holding %u s before teardown; try: iomm stat --pid %d\n",
                 options_.hold_seconds, static_cast<int>(getpid()));
    std::this_thread::sleep_for(std::chrono::seconds(options_.hold_seconds));
  }

  Snapshot snapshot(size_t number, std::string_view name, std::string note) const {
    Snapshot s{number, name, 0, counters(), {}, std::nullopt, std::move(note)};
    if (ioas_) s.mappings = ioas_->counters().mappings;
    if (domain_a_) s.domains.push_back({"A", attached_a_, domain_a_->counters()});
    if (domain_b_) s.domains.push_back({"B", attached_b_, domain_b_->counters()});
    if (access_) s.access_pinned = access_->pinned_bytes();
    return s;
  }

  const DemoOptions options_;
  Fd memfd_;
  std::optional<MemorySource> source_;
  std::shared_ptr<Ioas> ioas_;
  std::shared_ptr<SoftDomain> domain_a_;
  std::shared_ptr<SoftDomain> domain_b_;
  bool attached_a_ = false;
  bool attached_b_ = false;
  uint64_t first_iova_ = 0;
  uint64_t second_iova_ = 0;
  // Declared before access_ so the callback's state outlives the access.
  AccessPins pins_;
  std::shared_ptr<Access> access_;
};

}  // namespace

int run_demo(const DemoOptions& options) {
  if (options.scenario == "invalidation") return run_invalidation_demo();
  if (options.scenario == "devmem") return run_devmem_demo(options);
  if (options.size < kMinSize || !is_aligned(options.size, kPageSize)) {
    std::fprintf(stderr, "iomm demo: --size must be a multiple of 4 KiB and at least %s\n",
                 format_bytes(kMinSize).c_str());
    return 2;
  }
  if (options.vfio_group >= 0) return run_vfio_demo(options);
  std::unique_ptr<Reporter> reporter;
  if (options.json) {
    reporter = std::make_unique<JsonReporter>();
  } else {
    reporter = std::make_unique<TableReporter>();
  }
  try {
    Demo demo(options);
    demo.run(*reporter);
  } catch (const DemoFailure& failure) {
    reporter->finish(false);
    std::fflush(stdout);
    std::fprintf(stderr, "iomm demo: %s\n", failure.what());
    return 1;
  }
  reporter->finish(true);
  return 0;
}

}  // namespace iomm::cli
