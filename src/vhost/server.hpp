// The vhost-user-blk server: listens on a unix socket and serves one front
// end at a time; a front end that connects while another is served waits
// in the listen backlog until the first disconnects.
//
// Contract
// - listen() binds the socket path (a stale socket file there is replaced;
//   any other file is EEXIST); the destructor closes and unlinks it.
// - serve() returns when stop_fd becomes readable (after the current
//   connection's in-flight requests, which complete synchronously, and an
//   image flush) or when accept fails. Each connection's state is released
//   when it ends, whatever the reason, and the image is flushed.
#pragma once

#include <string>

#include "iomm/result.hpp"
#include "vhost/blk_backend.hpp"
#include "vhost/blk_image.hpp"
#include "vhost/unique_fd.hpp"

namespace iomm::vhost {

class BlkServer {
 public:
  static Result<BlkServer> listen(const std::string& path);
  BlkServer(BlkServer&&) noexcept = default;
  BlkServer& operator=(BlkServer&&) noexcept = delete;
  ~BlkServer();

  Status serve(const BlkImage& image, const BlkBackendOptions& options, int stop_fd);
  [[nodiscard]] uint64_t connections() const noexcept { return connections_; }

 private:
  BlkServer(UniqueFd fd, std::string path) : fd_(std::move(fd)), path_(std::move(path)) {}
  UniqueFd fd_;
  std::string path_;
  uint64_t connections_ = 0;
};

}  // namespace iomm::vhost
