// `iomm vhost-blk`: serve a raw image as a vhost-user-blk device.
#include <signal.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cstdio>

#include "commands.hpp"
#include "vhost/blk_image.hpp"
#include "vhost/server.hpp"
#include "vhost/unique_fd.hpp"

namespace iomm::cli {

namespace {

int g_stop_fd = -1;

void on_signal(int) {
  const uint64_t one = 1;
  // Async-signal-safe; the serving loop polls this eventfd.
  (void)!::write(g_stop_fd, &one, sizeof(one));
}

}  // namespace

int run_vhost_blk(const VhostBlkOptions& options) {
  using namespace iomm::vhost;
  auto image = BlkImage::open(options.image, options.read_only);
  if (!image) {
    std::fprintf(stderr, "iomm vhost-blk: %s\n", image.error().describe().c_str());
    return 1;
  }
  UniqueFd stop(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!stop.valid()) {
    std::perror("iomm vhost-blk: eventfd");
    return 1;
  }
  g_stop_fd = stop.get();
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
  // A front end that vanishes must not kill the back end while it replies.
  ::signal(SIGPIPE, SIG_IGN);

  auto server = BlkServer::listen(options.socket);
  if (!server) {
    std::fprintf(stderr, "iomm vhost-blk: %s\n", server.error().describe().c_str());
    return 1;
  }
  std::fprintf(stderr,
               "iomm vhost-blk: serving %s (%llu sectors%s) on %s, %u queue(s) of up to %u\n",
               options.image.c_str(), static_cast<unsigned long long>(image->sectors()),
               options.read_only ? ", read-only" : "", options.socket.c_str(), options.num_queues,
               options.queue_size);
  BlkBackendOptions backend;
  backend.num_queues = options.num_queues;
  backend.queue_size = options.queue_size;
  backend.trace = options.trace;
  Status s = server->serve(*image, backend, stop.get());
  if (Status f = image->flush(); !f) {
    std::fprintf(stderr, "iomm vhost-blk: flush: %s\n", f.error().describe().c_str());
    return 1;
  }
  if (!s) {
    std::fprintf(stderr, "iomm vhost-blk: %s\n", s.error().describe().c_str());
    return 1;
  }
  return 0;
}

}  // namespace iomm::cli
