// The owner's service thread: one epoll loop that runs a handler whenever a
// watched descriptor (a consumer's userfaultfd, a consumer's socket) is
// readable or hung up. Shared by every region of one owner (a P2P pool's
// allocations share their pool's), so the thread count does not grow with
// the number of regions or mappings.
//
// Locking: the core's mu guards the handler table and is never held while a
// handler runs. unwatch() returns only once the handler is not running
// (unless it is called from the service thread itself), so a handler's state
// may be freed right after.
//
// Lifetime: the thread shares the core, so the last reference to the service
// may be dropped anywhere, even inside a handler on the service thread (the
// thread is then detached and ends after that handler).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "iomm/result.hpp"

namespace iomm::devmem {

class FaultService {
 public:
  // events: the epoll event bits (EPOLLIN, EPOLLHUP, ...).
  using Handler = std::function<void(uint32_t events)>;

  static Result<std::shared_ptr<FaultService>> create();
  ~FaultService();
  FaultService(const FaultService&) = delete;
  FaultService& operator=(const FaultService&) = delete;

  // Watch fd (not owned) until unwatch(); returns the key for unwatch.
  Result<uint64_t> watch(int fd, Handler handler);
  void unwatch(uint64_t key) noexcept;
  [[nodiscard]] bool on_service_thread() const noexcept;

 private:
  struct Core;
  explicit FaultService(std::shared_ptr<Core> core) : core_(std::move(core)) {}
  static void run(const std::shared_ptr<Core>& core) noexcept;

  std::shared_ptr<Core> core_;
  std::thread thread_;
};

}  // namespace iomm::devmem
