// P2P pools: a first-fit allocator over the pool's range, blocks with named
// references, and unbind in the seed's order (docs/design.md, "Device
// memory").
//
// Lock order: PoolState::mu, then Block::mu (only unbind's wait takes both);
// a block never takes the pool's lock while holding its own. Neither is held
// while a region, an IOAS or the RCU grace period is called or waited for.
#include "iomm/p2p_pool.hpp"

#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <map>
#include <mutex>
#include <new>

#include "devmem/device_object.hpp"
#include "devmem/region_state.hpp"
#include "devmem/uffd.hpp"
#include "iomm/rcu.hpp"
#include "sync/rcu.hpp"

namespace iomm::devmem {

namespace {

std::string hex(uint64_t v) {
  char text[24];
  std::snprintf(text, sizeof text, "0x%llx", static_cast<unsigned long long>(v));
  return text;
}

}  // namespace

struct PoolState {
  std::string name;
  uint64_t capacity = 0;
  Granularity granularity = Granularity::page;
  std::shared_ptr<FaultService> service;

  // Read lock-free by allocate() inside an RCU read-side section; unbind
  // clears it and waits for a grace period.
  std::atomic<bool> active{true};

  mutable std::mutex mu;
  std::condition_variable released;
  std::map<uint64_t, uint64_t> free_ranges;           // offset -> length, coalesced
  std::map<uint64_t, std::shared_ptr<Block>> blocks;  // by offset, until freed
  uint64_t allocated_bytes = 0;
  bool unbound = false;

  std::optional<uint64_t> reserve(uint64_t length);  // mu held
  void give_back(uint64_t offset, uint64_t length);  // mu held; never allocates
};

struct Block : std::enable_shared_from_this<Block> {
  struct IoasMapping {
    std::weak_ptr<Ioas> ioas;
    uint64_t iova;
    uint64_t holder;
  };

  std::shared_ptr<PoolState> pool;
  uint64_t offset = 0;
  uint64_t length = 0;
  std::shared_ptr<DeviceRegion> region;

  mutable std::mutex mu;
  std::map<uint64_t, std::string> holders;       // mu
  std::map<uint64_t, uint64_t> mapping_holders;  // consumer mapping id -> holder; mu
  std::vector<IoasMapping> ioas_mappings;        // mu
  uint64_t next_holder = 1;                      // mu
  bool handle = true;                            // the P2pAllocation lives; mu
  bool revoked = false;                          // unbind began; mu
  bool freed = false;                            // mu

  Result<uint64_t> add_holder(std::string name);
  void drop_holder(uint64_t id) noexcept;
  void drop_handle() noexcept;
  // Called with mu held: whether the last reference is gone.
  [[nodiscard]] bool unreferenced() const { return holders.empty() && (!handle || revoked); }
  void free() noexcept;
};

namespace {

// Counts every consumer mapping of a block's region as a reference.
class BlockObserver final : public MappingObserver {
 public:
  explicit BlockObserver(std::weak_ptr<Block> block) : block_(std::move(block)) {}
  Status attached(uint64_t id, int pid, uint64_t address) override {
    auto block = block_.lock();
    if (!block) return Error(ENODEV, "the pool allocation is gone");
    auto holder =
        block->add_holder("consumer mapping of pid " + std::to_string(pid) + " at " + hex(address));
    if (!holder.ok()) return holder.error();
    std::lock_guard lock(block->mu);
    block->mapping_holders[id] = *holder;
    return {};
  }
  void detached(uint64_t id) noexcept override {
    auto block = block_.lock();
    if (!block) return;
    uint64_t holder = 0;
    {
      std::lock_guard lock(block->mu);
      auto it = block->mapping_holders.find(id);
      if (it == block->mapping_holders.end()) return;  // dropped by unbind's zap
      holder = it->second;
      block->mapping_holders.erase(it);
    }
    block->drop_holder(holder);
  }

 private:
  std::weak_ptr<Block> block_;
};

}  // namespace

std::optional<uint64_t> PoolState::reserve(uint64_t length) {
  for (auto it = free_ranges.begin(); it != free_ranges.end(); ++it) {
    if (it->second < length) continue;
    const uint64_t offset = it->first;
    const uint64_t rest = it->second - length;
    free_ranges.erase(it);
    if (rest > 0) free_ranges.emplace(offset + length, rest);
    return offset;
  }
  return std::nullopt;
}

void PoolState::give_back(uint64_t offset, uint64_t length) {
  // Coalesce with the neighbours; the node erased or reused keeps this from
  // allocating beyond the one emplace, which replaces the range a reserve
  // split off (so it cannot fail for lack of memory in practice: the map
  // never holds more nodes than it did after the reserve).
  auto next = free_ranges.lower_bound(offset);
  if (next != free_ranges.end() && offset + length == next->first) {
    length += next->second;
    next = free_ranges.erase(next);
  }
  if (next != free_ranges.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == offset) {
      prev->second += length;
      return;
    }
  }
  free_ranges.emplace_hint(next, offset, length);
}

Result<uint64_t> Block::add_holder(std::string name) {
  std::lock_guard lock(mu);
  if (revoked || freed) return Error(ENODEV, "the P2P pool is being unbound");
  const uint64_t id = next_holder++;
  try {
    holders.emplace(id, std::move(name));
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory for a reference");
  }
  return id;
}

void Block::drop_holder(uint64_t id) noexcept {
  bool last;
  {
    std::lock_guard lock(mu);
    if (holders.erase(id) == 0) return;
    last = unreferenced() && !freed;
    if (last) freed = true;
  }
  if (last) free();
  std::lock_guard lock(pool->mu);
  pool->released.notify_all();
}

void Block::drop_handle() noexcept {
  bool last;
  {
    std::lock_guard lock(mu);
    handle = false;
    last = unreferenced() && !freed;
    if (last) freed = true;
  }
  if (last) free();
}

void Block::free() noexcept {
  // Nothing reaches the memory any more; cut it off for good anyway, so a
  // mapping nobody registered gets SIGBUS, never the next user's data.
  region->state().stop();
  region->state().zap();
  std::lock_guard lock(pool->mu);
  pool->give_back(offset, length);
  pool->allocated_bytes -= length;
  pool->blocks.erase(offset);
  pool->released.notify_all();
}

}  // namespace iomm::devmem

namespace iomm {

using devmem::Block;
using devmem::PoolState;

AllocationRef::AllocationRef(AllocationRef&& other) noexcept
    : block_(std::move(other.block_)), id_(other.id_) {}

AllocationRef& AllocationRef::operator=(AllocationRef&& other) noexcept {
  if (this != &other) {
    release();
    block_ = std::move(other.block_);
    id_ = other.id_;
  }
  return *this;
}

AllocationRef::~AllocationRef() { release(); }

void AllocationRef::release() noexcept {
  if (block_) block_->drop_holder(id_);
  block_.reset();
}

P2pAllocation::~P2pAllocation() { block_->drop_handle(); }

uint64_t P2pAllocation::pool_offset() const noexcept { return block_->offset; }
uint64_t P2pAllocation::length() const noexcept { return block_->length; }
const std::shared_ptr<DeviceRegion>& P2pAllocation::region() const noexcept {
  return block_->region;
}

Result<uint64_t> P2pAllocation::map_into(const std::shared_ptr<Ioas>& ioas, uint32_t prot,
                                         std::optional<uint64_t> iova) {
  auto holder = block_->add_holder("IOAS mapping (being made)");
  if (!holder.ok()) return holder.error();
  auto object = devmem::DeviceObject::create(block_->region->exported().fd, block_->length, true);
  if (!object.ok()) {
    block_->drop_holder(*holder);
    return object.error();
  }
  auto mapped = ioas->map(
      MemorySource::from_backing(std::move(object).value(), 0, block_->length, true), prot, iova);
  if (!mapped.ok()) {
    block_->drop_holder(*holder);
    return mapped.error();
  }
  {
    std::lock_guard lock(block_->mu);
    if (!block_->revoked) {
      try {
        block_->holders[*holder] = "IOAS mapping at IOVA " + devmem::hex(*mapped);
        block_->ioas_mappings.push_back({ioas, *mapped, *holder});
        return *mapped;
      } catch (const std::bad_alloc&) {
        // Fall through: undone below like a mapping unbind raced with.
      }
    }
  }
  // Unbind began meanwhile (it waits for this reference) or bookkeeping
  // failed: take the mapping back out.
  const bool revoked = [&] {
    std::lock_guard lock(block_->mu);
    return block_->revoked;
  }();
  (void)ioas->unmap(*mapped, block_->length);
  block_->drop_holder(*holder);
  return revoked ? Error(ENODEV, "the P2P pool is being unbound")
                 : Error(ENOMEM, "out of memory for an IOAS registration");
}

Status P2pAllocation::unmap_from(const std::shared_ptr<Ioas>& ioas, uint64_t iova) {
  uint64_t holder = 0;
  {
    std::lock_guard lock(block_->mu);
    auto it = std::find_if(
        block_->ioas_mappings.begin(), block_->ioas_mappings.end(),
        [&](const Block::IoasMapping& m) { return m.iova == iova && m.ioas.lock() == ioas; });
    if (it == block_->ioas_mappings.end()) return Error(ENOENT, "no such IOAS registration");
    holder = it->holder;
    block_->ioas_mappings.erase(it);
  }
  auto unmapped = ioas->unmap(iova, block_->length);
  if (!unmapped.ok()) {
    std::lock_guard lock(block_->mu);
    block_->ioas_mappings.push_back({ioas, iova, holder});
    return unmapped.error();
  }
  block_->drop_holder(holder);
  return {};
}

Result<MemorySource> P2pAllocation::unregistered_source() const {
  auto object = devmem::DeviceObject::create(block_->region->exported().fd, block_->length, false);
  if (!object.ok()) return object.error();
  return MemorySource::from_backing(std::move(object).value(), 0, block_->length, true);
}

Result<AllocationRef> P2pAllocation::hold(std::string holder) {
  auto id = block_->add_holder(std::move(holder));
  if (!id.ok()) return id.error();
  return AllocationRef(block_, *id);
}

std::vector<std::string> P2pAllocation::holders() const {
  std::vector<std::string> out;
  std::lock_guard lock(block_->mu);
  for (const auto& [id, name] : block_->holders) out.push_back(name);
  return out;
}

Result<std::shared_ptr<P2pPool>> P2pPool::create(const PoolOptions& options) {
  if (options.size == 0 || options.size % devmem::kPage != 0) {
    return Error(EINVAL, "a pool's size must be a non-zero multiple of 4 KiB");
  }
  auto service = devmem::FaultService::create();
  if (!service.ok()) return service.error();
  try {
    auto state = std::make_shared<PoolState>();
    state->name = options.name;
    state->capacity = options.size;
    state->granularity = options.granularity;
    state->service = std::move(service).value();
    state->free_ranges.emplace(0, options.size);
    return std::make_shared<P2pPool>(std::move(state));
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory for a pool");
  }
}

P2pPool::~P2pPool() { (void)unbind(std::chrono::milliseconds(0)); }

Result<std::shared_ptr<P2pAllocation>> P2pPool::allocate(uint64_t length) {
  if (length == 0 || length % devmem::kPage != 0) {
    return Error(EINVAL, "an allocation's length must be a non-zero multiple of 4 KiB");
  }
  std::optional<uint64_t> offset;
  {
    // The check and the reservation sit in one read-side section: once
    // unbind's grace period ends, every allocation that saw the pool active
    // holds its range, and its publication below sees the pool inactive.
    RcuReadGuard guard;
    if (!state_->active.load(std::memory_order_acquire)) {
      return Error(ENODEV, "the P2P pool is unbound");
    }
    std::lock_guard lock(state_->mu);
    try {
      offset = state_->reserve(length);
    } catch (const std::bad_alloc&) {
      return Error(ENOMEM, "out of memory for the pool's free list");
    }
    if (!offset) return Error(ENOSPC, "no free range of the P2P pool is large enough");
    state_->allocated_bytes += length;
  }
  const auto undo = [&] {
    std::lock_guard lock(state_->mu);
    state_->give_back(*offset, length);
    state_->allocated_bytes -= length;
    state_->released.notify_all();
  };
  auto region = devmem::RegionState::create({.name = state_->name + "@" + devmem::hex(*offset),
                                             .size = length,
                                             .granularity = state_->granularity},
                                            state_->service);
  if (!region.ok()) {
    undo();
    return region.error();
  }
  std::shared_ptr<Block> block;
  std::shared_ptr<P2pAllocation> handle;
  try {
    block = std::make_shared<Block>();
    block->pool = state_;
    block->offset = *offset;
    block->length = length;
    block->region = std::make_shared<DeviceRegion>(*region);
    (*region)->set_observer(std::make_shared<devmem::BlockObserver>(block));
    handle = std::make_shared<P2pAllocation>(block);
  } catch (const std::bad_alloc&) {
    undo();
    return Error(ENOMEM, "out of memory for an allocation");
  }
  Status published;
  {
    std::lock_guard lock(state_->mu);
    if (!state_->active.load(std::memory_order_acquire)) {
      // Unbind began after our check and never saw this block.
      published = Error(ENODEV, "the P2P pool is unbound");
    } else {
      try {
        state_->blocks.emplace(*offset, block);
      } catch (const std::bad_alloc&) {
        published = Error(ENOMEM, "out of memory for an allocation");
      }
    }
  }
  // On failure the handle's destructor frees the block, outside the lock.
  if (!published) return published.error();
  return handle;
}

Status P2pPool::unbind(std::chrono::milliseconds wait) {
  PoolState& s = *state_;
  // 1. Stop new allocations, references and faults.
  s.active.store(false, std::memory_order_release);
  std::vector<std::shared_ptr<Block>> blocks;
  {
    std::lock_guard lock(s.mu);
    for (auto& [offset, b] : s.blocks) blocks.push_back(b);
  }
  for (auto& b : blocks) {
    {
      std::lock_guard lock(b->mu);
      b->revoked = true;
    }
    b->region->state().stop();
  }
  // 2. Wait for lock-free readers of `active` (allocations in flight: the
  // ones that saw it set publish their block under s.mu, see it cleared
  // and free it; the snapshot above, taken under s.mu after the store,
  // holds every other).
  sync::rcu_synchronize();
  for (auto& b : blocks) {
    // 3. Zap: every consumer mapping loses its pages and gets SIGBUS from
    // now on; the mappings survive but no longer reach memory, so they stop
    // counting as references.
    b->region->state().zap();
    std::vector<uint64_t> dropped;
    {
      std::lock_guard lock(b->mu);
      for (auto& [id, holder] : b->mapping_holders) dropped.push_back(holder);
      b->mapping_holders.clear();
    }
    for (uint64_t h : dropped) b->drop_holder(h);
  }
  // 4. Revoke IOAS mappings; Ioas::unmap notifies the accesses pinning them.
  std::string failures;
  for (auto& b : blocks) {
    std::vector<Block::IoasMapping> mappings;
    {
      std::lock_guard lock(b->mu);
      mappings.swap(b->ioas_mappings);
    }
    for (auto& m : mappings) {
      auto ioas = m.ioas.lock();
      if (ioas) {
        auto unmapped = ioas->unmap(m.iova, b->length);
        if (!unmapped.ok() && unmapped.code() != ENOENT) {
          failures += " [IOAS mapping at IOVA " + devmem::hex(m.iova) + ": " +
                      unmapped.error().describe() + "]";
          std::lock_guard lock(b->mu);
          b->ioas_mappings.push_back(m);
          continue;
        }
      }
      b->drop_holder(m.holder);
    }
  }
  // 5. Wait, bounded, for what is left (holds, IOAS mappings that refused).
  const auto deadline = std::chrono::steady_clock::now() + wait;
  std::unique_lock lock(s.mu);
  s.released.wait_until(lock, deadline, [&] {
    return std::all_of(blocks.begin(), blocks.end(), [](const std::shared_ptr<Block>& b) {
      std::lock_guard block_lock(b->mu);
      return b->holders.empty();
    });
  });
  std::string held;
  for (auto& b : blocks) {
    std::lock_guard block_lock(b->mu);
    if (b->holders.empty()) continue;
    held += " allocation at pool offset " + devmem::hex(b->offset) + " (" +
            std::to_string(b->length) + " bytes) held by:";
    for (const auto& [id, name] : b->holders) held += " \"" + name + "\"";
    held += ";";
  }
  if (!held.empty()) {
    return Error(ETIMEDOUT, "unbind of P2P pool " + s.name +
                                " timed out waiting for references:" + held +
                                (failures.empty() ? "" : " IOAS unmap failures:" + failures));
  }
  s.unbound = true;
  lock.unlock();
  // 6. Free what no reference reached: the last drop freed the others.
  for (auto& b : blocks) {
    bool last;
    {
      std::lock_guard block_lock(b->mu);
      last = b->unreferenced() && !b->freed;
      if (last) b->freed = true;
    }
    if (last) b->free();
  }
  return {};
}

PoolCounters P2pPool::counters() const {
  PoolCounters c;
  std::vector<std::shared_ptr<Block>> blocks;
  {
    std::lock_guard lock(state_->mu);
    c.capacity = state_->capacity;
    c.allocated_bytes = state_->allocated_bytes;
    c.allocations = state_->blocks.size();
    c.unbound = state_->unbound;
    for (auto& [offset, b] : state_->blocks) blocks.push_back(b);
  }
  for (auto& b : blocks) {
    std::lock_guard lock(b->mu);
    c.references += b->holders.size();
  }
  return c;
}

}  // namespace iomm
