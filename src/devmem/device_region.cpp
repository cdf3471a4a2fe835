// The owner side of device regions: memfds, the enable gate, consumer
// registration and the fault handling run on the service thread.
#include "iomm/device_region.hpp"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <new>

#include "devmem/region_state.hpp"
#include "devmem/uffd.hpp"
#include "devmem/vma_check.hpp"
#include "devmem/wire.hpp"

namespace iomm::devmem {

namespace {

// Copy n bytes from src into fd at offset with pwrite: unlike a store into a
// shared mapping, running out of memory is an error, not a SIGBUS.
Status write_fd(int fd, const std::byte* src, uint64_t n, uint64_t offset) {
  while (n > 0) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(n, 1ULL << 30));
    const ssize_t done = pwrite(fd, src, chunk, static_cast<off_t>(offset));
    if (done < 0) {
      if (errno == EINTR) continue;
      return Error(errno, "pwrite of device memory");
    }
    src += done;
    offset += static_cast<uint64_t>(done);
    n -= static_cast<uint64_t>(done);
  }
  return {};
}

Status read_fd(int fd, std::byte* dst, uint64_t n, uint64_t offset) {
  while (n > 0) {
    const ssize_t done = pread(fd, dst, static_cast<size_t>(n), static_cast<off_t>(offset));
    if (done < 0) {
      if (errno == EINTR) continue;
      return Error(errno, "pread of device memory");
    }
    if (done == 0) return Error(EIO, "device memory shorter than expected");
    dst += done;
    offset += static_cast<uint64_t>(done);
    n -= static_cast<uint64_t>(done);
  }
  return {};
}

bool range_ok(uint64_t offset, uint64_t length, uint64_t size) {
  return length <= size && offset <= size - length;
}

}  // namespace

Consumer::~Consumer() {
  if (uffd >= 0) close(uffd);
}

Result<std::shared_ptr<RegionState>> RegionState::create(const RegionOptions& options,
                                                         std::shared_ptr<FaultService> service) {
  if (options.size == 0 || options.size % kPage != 0) {
    return Error(EINVAL, "a device region's size must be a non-zero multiple of 4 KiB");
  }
  if (options.granularity != Granularity::page && options.granularity != Granularity::huge) {
    return Error(EINVAL, "granularity must be 4 KiB or 2 MiB");
  }
  std::shared_ptr<RegionState> s;
  try {
    s = std::make_shared<RegionState>();
    s->name = options.name;
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory for a device region");
  }
  s->size = options.size;
  s->granule = static_cast<uint64_t>(options.granularity);
  s->view_fd = memfd_create(options.name.c_str(), MFD_CLOEXEC);
  if (s->view_fd < 0) return Error(errno, "memfd_create (view)");
  s->contents_fd = memfd_create((options.name + "-contents").c_str(), MFD_CLOEXEC);
  if (s->contents_fd < 0) return Error(errno, "memfd_create (contents)");
  const off_t size = static_cast<off_t>(options.size);
  if (ftruncate(s->view_fd, size) != 0 || ftruncate(s->contents_fd, size) != 0) {
    return Error(errno, "ftruncate of device memory");
  }
  // Every page of the view exists while memory is enabled, so a consumer's
  // first touch is a minor fault the owner serves, never a fresh page.
  if (fallocate(s->view_fd, 0, 0, size) != 0) return Error(errno, "fallocate of device memory");
  struct stat st {};
  if (fstat(s->view_fd, &st) != 0) return Error(errno, "fstat");
  s->dev = st.st_dev;
  s->ino = st.st_ino;
  if (!service) {
    auto created = FaultService::create();
    if (!created.ok()) return created.error();
    service = std::move(created).value();
  }
  s->service = std::move(service);
  return s;
}

RegionState::~RegionState() {
  shutdown();
  if (view_fd >= 0) close(view_fd);
  if (contents_fd >= 0) close(contents_fd);
}

void RegionState::shutdown() noexcept {
  std::map<uint64_t, std::shared_ptr<Consumer>> consumers;
  std::map<uint64_t, Connection> connections;
  {
    std::lock_guard lock(consumers_mu_);
    consumers.swap(consumers_);
    connections.swap(connections_);
  }
  for (auto& [id, c] : connections) {
    service->unwatch(c.watch_key);
    close(c.fd);
  }
  for (auto& [id, c] : consumers) forget(c);
}

Result<uint64_t> RegionState::attach(int uffd, uint64_t features, uint64_t address, uint64_t offset,
                                     uint64_t length, int pid, uint64_t connection) {
  std::shared_ptr<Consumer> c;
  try {
    c = std::make_shared<Consumer>();
  } catch (const std::bad_alloc&) {
    close(uffd);
    return Error(ENOMEM, "out of memory for a consumer mapping");
  }
  c->uffd = uffd;
  c->features = features;
  c->address = address;
  c->offset = offset;
  c->length = length;
  c->pid = pid;
  c->connection = connection;
  if (length == 0 || offset % kPage != 0 || length % kPage != 0 || address % kPage != 0 ||
      !range_ok(offset, length, size)) {
    return Error(EINVAL, "consumer mapping outside the region or not page aligned");
  }
  // A remote consumer's word is checked against its VMAs. In-process
  // mappings come from DeviceMapping::map, which has just mapped the view
  // shared itself (and a scan of our own maps per mapping would make
  // registering n mappings O(n^2)).
  if (connection != 0) {
    if (Status st = check_shared_mapping(pid, address, length, dev, ino, offset); !st) {
      return st.error();
    }
  }
  {
    std::lock_guard lock(consumers_mu_);
    c->id = next_id_++;
  }
  if (observer_) {
    if (Status st = observer_->attached(c->id, pid, address); !st) return st.error();
  }
  std::weak_ptr<RegionState> weak = weak_from_this();
  auto key = service->watch(c->uffd, [weak, raw = c.get()](uint32_t) {
    if (auto self = weak.lock()) self->on_uffd(*raw);
  });
  if (!key.ok()) {
    if (observer_) observer_->detached(c->id);
    return key.error();
  }
  c->watch_key = *key;
  try {
    std::lock_guard lock(consumers_mu_);
    consumers_.emplace(c->id, c);
  } catch (const std::bad_alloc&) {
    service->unwatch(c->watch_key);
    if (observer_) observer_->detached(c->id);
    return Error(ENOMEM, "out of memory for a consumer mapping");
  }
  return c->id;
}

void RegionState::forget(const std::shared_ptr<Consumer>& consumer) noexcept {
  service->unwatch(consumer->watch_key);
  if (observer_) observer_->detached(consumer->id);
}

Status RegionState::detach(uint64_t id) noexcept {
  std::shared_ptr<Consumer> c;
  {
    std::lock_guard lock(consumers_mu_);
    auto it = consumers_.find(id);
    if (it == consumers_.end()) return Error(ENOENT, "no such consumer mapping");
    c = std::move(it->second);
    consumers_.erase(it);
  }
  forget(c);
  return {};
}

void RegionState::on_uffd(Consumer& consumer) noexcept {
  std::array<uffd_msg, 16> msgs;
  for (;;) {
    const ssize_t n = ::read(consumer.uffd, msgs.data(), sizeof msgs);
    if (n <= 0) return;  // EAGAIN: drained
    for (ssize_t i = 0; i < n / static_cast<ssize_t>(sizeof(uffd_msg)); ++i) {
      if (msgs[i].event == UFFD_EVENT_PAGEFAULT)
        serve_fault(consumer, msgs[i].arg.pagefault.address);
    }
  }
}

void RegionState::refuse(Consumer& consumer, uint64_t page, bool revoked) noexcept {
  refused_.fetch_add(1, std::memory_order_relaxed);
  // A revoked region never comes back, so a poison marker may stay forever:
  // the access gets SIGBUS at once. A disabled one comes back, and a marker
  // would outlive the enable; the woken access refaults past the end of the
  // truncated view and gets SIGBUS from the kernel instead.
  if (revoked && (consumer.features & UFFD_FEATURE_POISON) != 0) {
    uffdio_poison poison{};
    poison.range = {page, kPage};
    if (ioctl(consumer.uffd, UFFDIO_POISON, &poison) == 0) return;
  }
  uffdio_range wake{page, kPage};
  ioctl(consumer.uffd, UFFDIO_WAKE, &wake);
}

void RegionState::serve_fault(Consumer& consumer, uint64_t address) noexcept {
  faults_.fetch_add(1, std::memory_order_relaxed);
  const uint64_t page = address & ~(kPage - 1);
  if (page < consumer.address || page - consumer.address >= consumer.length) return;
  std::shared_lock lock(state_mu_);
  if (memory_ != Memory::enabled) {
    refuse(consumer, page, memory_ == Memory::revoked);
    return;
  }
  // The granule around the fault, in region offsets, clipped to the mapping.
  const uint64_t offset = consumer.offset + (page - consumer.address);
  const uint64_t first = std::max(offset & ~(granule - 1), consumer.offset);
  const uint64_t last =
      std::min((offset & ~(granule - 1)) + granule, consumer.offset + consumer.length);
  uint64_t start = consumer.address + (first - consumer.offset);
  const uint64_t end = consumer.address + (last - consumer.offset);
  bool woken = false;
  // Each pass installs a run or steps over one page: bounded by the granule.
  while (start < end) {
    uffdio_continue cont{};
    cont.range = {start, end - start};
    if (ioctl(consumer.uffd, UFFDIO_CONTINUE, &cont) == 0) {
      installed_bytes_.fetch_add(end - start, std::memory_order_relaxed);
      woken = woken || (page >= start && page < end);
      break;
    }
    const int err = errno;
    if (cont.mapped > 0) {
      // Stopped part way (at a page installed meanwhile): what it mapped is
      // whole and woken; go on from there.
      installed_bytes_.fetch_add(static_cast<uint64_t>(cont.mapped), std::memory_order_relaxed);
      woken = woken || (page >= start && page < start + static_cast<uint64_t>(cont.mapped));
      start += static_cast<uint64_t>(cont.mapped);
      continue;
    }
    if (err == EEXIST) {
      already_mapped_.fetch_add(1, std::memory_order_relaxed);
      start += kPage;
      continue;
    }
    // The consumer unmapped the range or is exiting (ENOENT, ESRCH), or the
    // page is gone from the view (EFAULT): nothing to install; the woken
    // access sorts itself out (a plain fault, or SIGBUS).
    break;
  }
  if (!woken) {
    uffdio_range wake{page, kPage};
    ioctl(consumer.uffd, UFFDIO_WAKE, &wake);
  }
}

Status RegionState::serve(int socket) {
  const int one = 1;
  if (setsockopt(socket, SOL_SOCKET, SO_PASSCRED, &one, sizeof one) != 0) {
    const int err = errno;
    close(socket);
    return Error(err, "setsockopt(SO_PASSCRED)");
  }
  uint64_t id;
  {
    std::lock_guard lock(consumers_mu_);
    id = next_id_++;
  }
  std::weak_ptr<RegionState> weak = weak_from_this();
  auto key = service->watch(socket, [weak, id](uint32_t events) {
    if (auto self = weak.lock()) self->on_socket(id, events);
  });
  if (!key.ok()) {
    close(socket);
    return key.error();
  }
  try {
    std::lock_guard lock(consumers_mu_);
    connections_.emplace(id, Connection{socket, *key});
  } catch (const std::bad_alloc&) {
    service->unwatch(*key);
    close(socket);
    return Error(ENOMEM, "out of memory for a consumer connection");
  }
  return {};
}

void RegionState::drop_connection(uint64_t connection) noexcept {
  Connection conn;
  std::vector<std::shared_ptr<Consumer>> gone;
  {
    std::lock_guard lock(consumers_mu_);
    auto it = connections_.find(connection);
    if (it == connections_.end()) return;
    conn = it->second;
    connections_.erase(it);
    for (auto c = consumers_.begin(); c != consumers_.end();) {
      if (c->second->connection == connection) {
        gone.push_back(std::move(c->second));
        c = consumers_.erase(c);
      } else {
        ++c;
      }
    }
  }
  service->unwatch(conn.watch_key);
  close(conn.fd);
  for (auto& c : gone) forget(c);
}

void RegionState::on_socket(uint64_t connection, uint32_t events) noexcept {
  int sock = -1;
  {
    std::lock_guard lock(consumers_mu_);
    auto it = connections_.find(connection);
    if (it == connections_.end()) return;
    sock = it->second.fd;
  }
  wire::Request req;
  int fd = -1;
  pid_t pid = 0;
  if ((events & EPOLLIN) == 0 || wire::recv_packet(sock, &req, sizeof req, &fd, &pid) != 0 ||
      req.magic != wire::kMagic) {
    if (fd >= 0) close(fd);
    drop_connection(connection);
    return;
  }
  wire::Reply reply;
  Status result;
  if (req.op == wire::kMap && fd >= 0 && pid > 0) {
    auto id = attach(fd, req.features, req.address, req.offset, req.length, pid, connection);
    fd = -1;
    if (id.ok()) {
      reply.id = *id;
    } else {
      result = std::move(id).error();
    }
  } else if (req.op == wire::kUnmap) {
    std::shared_ptr<Consumer> c;
    {
      std::lock_guard lock(consumers_mu_);
      auto it = consumers_.find(req.id);
      if (it != consumers_.end() && it->second->connection == connection) {
        c = std::move(it->second);
        consumers_.erase(it);
      }
    }
    if (c) {
      forget(c);
    } else {
      result = Error(ENOENT, "no such consumer mapping on this connection");
    }
  } else {
    result = Error(EPROTO, "malformed request");
  }
  if (fd >= 0) close(fd);
  if (!result) {
    reply.error = result.code();
    std::strncpy(reply.message, result.error().message().c_str(), sizeof reply.message - 1);
  }
  if (!wire::send_packet(sock, &reply, sizeof reply, -1)) drop_connection(connection);
}

Status RegionState::set_enabled(bool enabled) {
  std::unique_lock lock(state_mu_);
  if (memory_ == Memory::revoked) return Error(ENODEV, "device memory was revoked");
  if ((memory_ == Memory::enabled) == enabled) return {};
  // The side being copied from, mapped for the copy only.
  auto* const from = static_cast<std::byte*>(
      mmap(nullptr, size, PROT_READ, MAP_SHARED, enabled ? contents_fd : view_fd, 0));
  if (from == MAP_FAILED) return Error(errno, "mmap of device memory");
  Status st;
  if (enabled) {
    // Written in order, growing the file page by page: a consumer reaches
    // only pages that already hold the device's data (past the end it gets
    // SIGBUS, as while disabled). On failure the view is cut back to 0.
    st = write_fd(view_fd, from, size, 0);
    if (st) {
      // The saved copy is no longer needed.
      fallocate(contents_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                static_cast<off_t>(size));
      memory_ = Memory::enabled;
    } else {
      ftruncate(view_fd, 0);
    }
  } else {
    // Save first (a failure changes nothing), then truncate: every PTE of
    // the view goes from every mapping, and access past the end is SIGBUS.
    st = write_fd(contents_fd, from, size, 0);
    if (st) {
      ftruncate(view_fd, 0);
      memory_ = Memory::disabled;
    } else {
      fallocate(contents_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                static_cast<off_t>(size));
    }
  }
  munmap(from, size);
  return st;
}

Status RegionState::reset() {
  std::unique_lock lock(state_mu_);
  if (memory_ == Memory::revoked) return Error(ENODEV, "device memory was revoked");
  const off_t len = static_cast<off_t>(size);
  if (memory_ == Memory::disabled) {
    if (fallocate(contents_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, len) != 0) {
      return Error(errno, "fallocate(PUNCH_HOLE)");
    }
    return {};
  }
  // The punch zaps every mapping; the view is filled again with zero pages
  // so later touches stay minor faults the owner serves.
  if (fallocate(view_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, len) != 0) {
    return Error(errno, "fallocate(PUNCH_HOLE)");
  }
  if (fallocate(view_fd, 0, 0, len) != 0) return Error(errno, "fallocate");
  return {};
}

Status RegionState::read(uint64_t offset, void* buf, size_t length) const {
  if (!range_ok(offset, length, size)) return Error(EINVAL, "range outside the device region");
  std::shared_lock lock(state_mu_);
  if (memory_ == Memory::revoked) return Error(ENODEV, "device memory was revoked");
  return read_fd(memory_ == Memory::enabled ? view_fd : contents_fd, static_cast<std::byte*>(buf),
                 length, offset);
}

Status RegionState::write(uint64_t offset, const void* buf, size_t length) {
  if (!range_ok(offset, length, size)) return Error(EINVAL, "range outside the device region");
  std::shared_lock lock(state_mu_);
  if (memory_ == Memory::revoked) return Error(ENODEV, "device memory was revoked");
  return write_fd(memory_ == Memory::enabled ? view_fd : contents_fd,
                  static_cast<const std::byte*>(buf), length, offset);
}

void RegionState::stop() noexcept {
  std::unique_lock lock(state_mu_);
  memory_ = Memory::revoked;
}

void RegionState::zap() noexcept {
  std::unique_lock lock(state_mu_);
  ftruncate(view_fd, 0);
  ftruncate(contents_fd, 0);
}

RegionCounters RegionState::counters() const {
  RegionCounters c;
  c.faults = faults_.load(std::memory_order_relaxed);
  c.installed_bytes = installed_bytes_.load(std::memory_order_relaxed);
  c.already_mapped = already_mapped_.load(std::memory_order_relaxed);
  c.refused = refused_.load(std::memory_order_relaxed);
  {
    std::lock_guard lock(consumers_mu_);
    c.mappings = consumers_.size();
  }
  {
    std::shared_lock lock(state_mu_);
    c.enabled = memory_ == Memory::enabled;
    c.revoked = memory_ == Memory::revoked;
  }
  const auto features = kernel_features();
  c.poison = features.ok() && (*features & UFFD_FEATURE_POISON) != 0;
  return c;
}

std::vector<ConsumerMappingInfo> RegionState::mappings() const {
  std::vector<ConsumerMappingInfo> out;
  std::lock_guard lock(consumers_mu_);
  for (const auto& [id, c] : consumers_)
    out.push_back({id, c->pid, c->address, c->offset, c->length});
  return out;
}

}  // namespace iomm::devmem

namespace iomm {

Result<std::shared_ptr<DeviceRegion>> DeviceRegion::create(const RegionOptions& options) {
  auto state = devmem::RegionState::create(options, nullptr);
  if (!state.ok()) return state.error();
  try {
    return std::make_shared<DeviceRegion>(std::move(state).value());
  } catch (const std::bad_alloc&) {
    return Error(ENOMEM, "out of memory for a device region");
  }
}

DeviceRegion::DeviceRegion(std::shared_ptr<devmem::RegionState> state) : state_(std::move(state)) {}

DeviceRegion::~DeviceRegion() {
  state_->stop();
  state_->zap();
  state_->shutdown();
}

ExportedRegion DeviceRegion::exported() const noexcept {
  return {state_->view_fd, 0, state_->size};
}
uint64_t DeviceRegion::size() const noexcept { return state_->size; }
Granularity DeviceRegion::granularity() const noexcept {
  return static_cast<Granularity>(state_->granule);
}
Status DeviceRegion::read(uint64_t offset, void* buf, size_t length) const {
  return state_->read(offset, buf, length);
}
Status DeviceRegion::write(uint64_t offset, const void* buf, size_t length) {
  return state_->write(offset, buf, length);
}
Status DeviceRegion::set_memory_enabled(bool enabled) { return state_->set_enabled(enabled); }
bool DeviceRegion::memory_enabled() const noexcept { return state_->counters().enabled; }
Status DeviceRegion::reset() { return state_->reset(); }
Status DeviceRegion::serve(int socket) { return state_->serve(socket); }
RegionCounters DeviceRegion::counters() const { return state_->counters(); }
std::vector<ConsumerMappingInfo> DeviceRegion::mappings() const { return state_->mappings(); }

}  // namespace iomm
