#include "devmem/fault_service.hpp"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <new>

namespace iomm::devmem {

struct FaultService::Core {
  struct Entry {
    int fd;
    Handler handler;
  };
  Core(int ep, int stop) : epoll_fd(ep), stop_fd(stop) {}
  ~Core() {
    close(stop_fd);
    close(epoll_fd);
  }
  const int epoll_fd;
  const int stop_fd;
  std::atomic<bool> stopping{false};
  std::mutex mu;
  std::condition_variable idle;
  std::unordered_map<uint64_t, std::shared_ptr<Entry>> entries;  // mu
  uint64_t next_key = 1;                                         // mu
  uint64_t running_key = 0;                                      // mu
  std::thread::id thread_id;                                     // set before any watch
};

Result<std::shared_ptr<FaultService>> FaultService::create() {
  const int ep = epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) return Error(errno, "epoll_create1");
  const int stop = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop < 0) {
    const int err = errno;
    close(ep);
    return Error(err, "eventfd");
  }
  std::shared_ptr<Core> core;
  try {
    core = std::make_shared<Core>(ep, stop);
  } catch (const std::bad_alloc&) {
    close(stop);
    close(ep);
    return Error(ENOMEM, "out of memory for the fault service");
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = 0;
  if (epoll_ctl(ep, EPOLL_CTL_ADD, stop, &ev) != 0) return Error(errno, "epoll_ctl");
  try {
    std::shared_ptr<FaultService> service(new FaultService(core));
    service->thread_ = std::thread([core] { run(core); });
    core->thread_id = service->thread_.get_id();
    return service;
  } catch (const std::exception&) {
    return Error(ENOMEM, "cannot start the fault service thread");
  }
}

FaultService::~FaultService() {
  if (!thread_.joinable()) return;
  core_->stopping.store(true);
  const uint64_t one = 1;
  while (write(core_->stop_fd, &one, sizeof one) < 0 && errno == EINTR) {
  }
  if (on_service_thread()) {
    // Dropped by a handler: the thread holds the core and ends after it.
    thread_.detach();
  } else {
    thread_.join();
  }
}

Result<uint64_t> FaultService::watch(int fd, Handler handler) {
  std::shared_ptr<Core::Entry> entry;
  try {
    entry = std::make_shared<Core::Entry>(Core::Entry{fd, std::move(handler)});
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory for a watched descriptor");
  }
  std::lock_guard lock(core_->mu);
  const uint64_t key = core_->next_key++;
  try {
    core_->entries.emplace(key, entry);
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory for a watched descriptor");
  }
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLRDHUP;
  ev.data.u64 = key;
  if (epoll_ctl(core_->epoll_fd, EPOLL_CTL_ADD, fd, &ev) != 0) {
    const int err = errno;
    core_->entries.erase(key);
    return Error(err, "epoll_ctl(ADD)");
  }
  return key;
}

void FaultService::unwatch(uint64_t key) noexcept {
  std::unique_lock lock(core_->mu);
  auto it = core_->entries.find(key);
  if (it == core_->entries.end()) return;
  epoll_ctl(core_->epoll_fd, EPOLL_CTL_DEL, it->second->fd, nullptr);
  core_->entries.erase(it);
  if (on_service_thread()) return;
  core_->idle.wait(lock, [&] { return core_->running_key != key; });
}

bool FaultService::on_service_thread() const noexcept {
  return std::this_thread::get_id() == core_->thread_id;
}

void FaultService::run(const std::shared_ptr<Core>& core) noexcept {
  std::array<epoll_event, 64> events{};
  while (!core->stopping.load()) {
    const int n = epoll_wait(core->epoll_fd, events.data(), static_cast<int>(events.size()), -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;
    }
    for (int i = 0; i < n && !core->stopping.load(); ++i) {
      const uint64_t key = events[i].data.u64;
      if (key == 0) return;  // stop_fd
      std::shared_ptr<Core::Entry> entry;
      {
        std::lock_guard lock(core->mu);
        auto it = core->entries.find(key);
        if (it == core->entries.end()) continue;  // unwatched after epoll_wait returned
        entry = it->second;
        core->running_key = key;
      }
      entry->handler(events[i].events);
      entry.reset();
      {
        std::lock_guard lock(core->mu);
        core->running_key = 0;
      }
      core->idle.notify_all();
    }
  }
}

}  // namespace iomm::devmem
