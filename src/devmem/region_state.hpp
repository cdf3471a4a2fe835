// The owner side of a device region: its two memfds, its enable state, its
// registered consumer mappings and the fault handling the service thread
// runs for them. See include/iomm/device_region.hpp for the contract and
// docs/design.md, "Device memory", for the design.
//
// Lock order (outermost first): state_mu (shared by faults and device
// access, exclusive by enable/disable/reset/revoke), then consumers_mu
// (the mapping table, leaf; never held while unwatching a descriptor, which
// may wait for a running handler), then the service's own lock.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "devmem/fault_service.hpp"
#include "iomm/device_region.hpp"
#include "iomm/result.hpp"

namespace iomm::devmem {

// Told about every consumer mapping of a region, so the owner of the memory
// (a P2P allocation) can count it as a reference. attached() runs before the
// mapping is served and may refuse it; detached() runs after it is
// forgotten. Neither runs with a region lock held.
class MappingObserver {
 public:
  virtual ~MappingObserver() = default;
  virtual Status attached(uint64_t id, int pid, uint64_t address) = 0;
  virtual void detached(uint64_t id) noexcept = 0;
};

struct Consumer {
  uint64_t id = 0;
  int uffd = -1;  // owned
  uint64_t features = 0;
  uint64_t address = 0;
  uint64_t offset = 0;  // into the region
  uint64_t length = 0;
  int pid = 0;
  uint64_t connection = 0;  // 0: in-process
  uint64_t watch_key = 0;
  ~Consumer();
};

struct RegionState : std::enable_shared_from_this<RegionState> {
  enum class Memory { enabled, disabled, revoked };

  static Result<std::shared_ptr<RegionState>> create(const RegionOptions& options,
                                                     std::shared_ptr<FaultService> service);
  ~RegionState();

  // Register a consumer mapping; takes ownership of uffd (closed on
  // failure). For a remote consumer (connection != 0), checks that
  // [address, +length) of process pid is a shared mapping of the view at
  // offset.
  Result<uint64_t> attach(int uffd, uint64_t features, uint64_t address, uint64_t offset,
                          uint64_t length, int pid, uint64_t connection);
  // Forget a mapping (its consumer unmapped it). ENOENT if unknown.
  Status detach(uint64_t id) noexcept;
  Status serve(int socket);

  Status set_enabled(bool enabled);
  Status reset();
  Status read(uint64_t offset, void* buf, size_t length) const;
  Status write(uint64_t offset, const void* buf, size_t length);
  // Permanent revocation, in two steps so a pool can put its grace period
  // between them: stop() refuses every later fault and device access;
  // zap() truncates the view, so every mapping loses its pages and every
  // access gets SIGBUS, and drops the saved contents. Both never fail.
  void stop() noexcept;
  void zap() noexcept;
  // Forget every consumer and connection; on return no handler of this
  // region runs (unless called from one).
  void shutdown() noexcept;

  RegionCounters counters() const;
  std::vector<ConsumerMappingInfo> mappings() const;

  void set_observer(std::shared_ptr<MappingObserver> observer) { observer_ = std::move(observer); }

  // Fixed at creation.
  std::string name;
  uint64_t size = 0;
  uint64_t granule = 0;
  int view_fd = -1;
  int contents_fd = -1;
  dev_t dev = 0;
  ino_t ino = 0;
  std::shared_ptr<FaultService> service;

 private:
  struct Connection {
    int fd = -1;
    uint64_t watch_key = 0;
  };

  void on_uffd(Consumer& consumer) noexcept;
  void serve_fault(Consumer& consumer, uint64_t address) noexcept;
  void refuse(Consumer& consumer, uint64_t page, bool revoked) noexcept;
  void on_socket(uint64_t connection, uint32_t events) noexcept;
  void drop_connection(uint64_t connection) noexcept;
  void forget(const std::shared_ptr<Consumer>& consumer) noexcept;

  std::shared_ptr<MappingObserver> observer_;

  mutable std::shared_mutex state_mu_;
  Memory memory_ = Memory::enabled;  // state_mu_

  mutable std::mutex consumers_mu_;
  std::map<uint64_t, std::shared_ptr<Consumer>> consumers_;  // consumers_mu_
  std::map<uint64_t, Connection> connections_;               // consumers_mu_
  uint64_t next_id_ = 1;                                     // consumers_mu_

  std::atomic<uint64_t> faults_{0};
  std::atomic<uint64_t> installed_bytes_{0};
  std::atomic<uint64_t> already_mapped_{0};
  std::atomic<uint64_t> refused_{0};
};

}  // namespace iomm::devmem
