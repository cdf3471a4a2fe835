#include "vhost/message.hpp"

#include <sys/socket.h>
#include <sys/uio.h>

#include <cerrno>
#include <cstring>
#include <string>

namespace iomm::vhost {

namespace {

Error sys_error(const char* what) {
  const int e = errno;
  return Error(e == EAGAIN || e == EWOULDBLOCK ? EAGAIN : e,
               std::string(what) + ": " + std::strerror(e));
}

// Reads exactly buf.size() bytes; fds arriving with the first chunk are
// appended to fds.
Status read_exact(int sock, std::span<uint8_t> buf, std::vector<UniqueFd>* fds) {
  size_t done = 0;
  while (done < buf.size()) {
    iovec iov{buf.data() + done, buf.size() - done};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (fds != nullptr) {
      msg.msg_control = control;
      msg.msg_controllen = sizeof(control);
    }
    const ssize_t n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0) {
      if (errno == EINTR) continue;
      return sys_error("recvmsg");
    }
    if (fds != nullptr) {
      for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; ++i) {
          int fd = -1;
          std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
          fds->emplace_back(fd);
        }
      }
      if ((msg.msg_flags & MSG_CTRUNC) != 0)
        return Error(EPROTO, "more fds than a message may carry (SCM_RIGHTS truncated)");
    }
    if (n == 0) return Error(ECONNRESET, "the front end closed the connection");
    done += static_cast<size_t>(n);
  }
  return {};
}

}  // namespace

Result<Message> receive_message(int sock) {
  Message m;
  if (Status s = read_exact(
          sock, std::span(reinterpret_cast<uint8_t*>(&m.header), sizeof(m.header)), &m.fds);
      !s)
    return s.error();
  if ((m.header.flags & kFlagVersionMask) != kFlagVersion)
    return Error(EPROTO, "message flags 0x" + std::to_string(m.header.flags) +
                             " do not carry protocol version 1");
  if (m.header.size > kMaxPayload)
    return Error(EPROTO, "payload of " + std::to_string(m.header.size) + " bytes for " +
                             request_name(m.header.request) + " exceeds " +
                             std::to_string(kMaxPayload));
  m.payload.resize(m.header.size);
  if (Status s = read_exact(sock, m.payload, nullptr); !s) return s.error();
  return m;
}

Status send_message(int sock, uint32_t request, uint32_t flags, std::span<const uint8_t> payload,
                    std::span<const int> fds) {
  if (fds.size() > kMaxFds) return Error(EINVAL, "too many fds for one message");
  MsgHeader h{request, flags, static_cast<uint32_t>(payload.size())};
  iovec iov[2] = {{&h, sizeof(h)}, {const_cast<uint8_t*>(payload.data()), payload.size()}};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)] = {};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = payload.empty() ? 1 : 2;
  if (!fds.empty()) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  const size_t total = sizeof(h) + payload.size();
  for (;;) {
    const ssize_t n = ::sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return sys_error("sendmsg");
    // A unix stream socket takes a whole small message or blocks; a short
    // write would desynchronise the stream.
    if (static_cast<size_t>(n) != total)
      return Error(EIO, "short sendmsg on the vhost-user socket");
    return {};
  }
}

}  // namespace iomm::vhost
