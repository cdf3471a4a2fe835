#include "vhost/server.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

namespace iomm::vhost {

namespace {

// A front end that stops in the middle of a message for this long is
// dropped rather than allowed to hold the back end.
constexpr timeval kMidMessageTimeout{5, 0};

}  // namespace

Result<BlkServer> BlkServer::listen(const std::string& path) {
  sockaddr_un addr{};
  if (path.empty() || path.size() >= sizeof(addr.sun_path))
    return Error(ENAMETOOLONG, "socket path '" + path + "' is empty or too long");
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) return Error(EEXIST, path + " exists and is not a socket");
    ::unlink(path.c_str());
  }
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return Error(errno, "socket");
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0)
    return Error(errno, "bind " + path + ": " + std::strerror(errno));
  if (::listen(fd.get(), 1) != 0) {
    const int e = errno;
    ::unlink(path.c_str());
    return Error(e, "listen");
  }
  return BlkServer(std::move(fd), path);
}

BlkServer::~BlkServer() {
  if (fd_.valid()) ::unlink(path_.c_str());
}

Status BlkServer::serve(const BlkImage& image, const BlkBackendOptions& options, int stop_fd) {
  auto log = [&](const std::string& s) {
    if (options.log)
      options.log(s);
    else
      std::fprintf(stderr, "iomm vhost-blk: %s\n", s.c_str());
  };
  for (;;) {
    pollfd fds[2] = {{stop_fd, POLLIN, 0}, {fd_.get(), POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return Error(errno, "poll");
    }
    if (fds[0].revents != 0) return {};
    if (fds[1].revents == 0) continue;
    UniqueFd conn(::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!conn.valid()) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return Error(errno, "accept");
    }
    (void)::setsockopt(conn.get(), SOL_SOCKET, SO_RCVTIMEO, &kMidMessageTimeout,
                       sizeof(kMidMessageTimeout));
    ++connections_;
    log("front end connected");
    Status end;
    {
      BlkBackend backend(image, options, std::move(conn));
      end = backend.run(stop_fd);
      backend.log_summary();
    }
    if (Status f = image.flush(); !f) log("flushing the image: " + f.error().describe());
    if (end.code() == ECANCELED) {
      log("stopped");
      return {};
    }
    log("front end gone (" + end.error().message() + "); waiting for the next");
  }
}

}  // namespace iomm::vhost
