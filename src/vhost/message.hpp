// vhost-user message framing on a unix stream socket: one header, a payload
// of at most kMaxPayload bytes, and the SCM_RIGHTS fds that came with it.
//
// Contract
// - receive() reads exactly one message or fails; fds that arrive with a
//   message it refuses are closed, never leaked or kept.
// - Errors: ECONNRESET the peer closed the socket (also mid-message);
//   EPROTO a bad version, a payload longer than kMaxPayload, or fds that
//   did not fit (MSG_CTRUNC); EAGAIN the peer stopped mid-message for
//   longer than the socket's receive timeout; other errnos from recvmsg.
// - send() writes the header, payload and fds in one sendmsg; EPIPE when
//   the peer is gone (SIGPIPE is never raised).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "iomm/result.hpp"
#include "vhost/protocol.hpp"
#include "vhost/unique_fd.hpp"

namespace iomm::vhost {

struct Message {
  MsgHeader header;
  std::vector<uint8_t> payload;
  std::vector<UniqueFd> fds;

  [[nodiscard]] bool need_reply() const noexcept { return (header.flags & kFlagNeedReply) != 0; }
};

Result<Message> receive_message(int sock);
Status send_message(int sock, uint32_t request, uint32_t flags, std::span<const uint8_t> payload,
                    std::span<const int> fds = {});

template <typename T>
Status send_value(int sock, uint32_t request, uint32_t flags, const T& value) {
  return send_message(sock, request, flags,
                      std::span(reinterpret_cast<const uint8_t*>(&value), sizeof(T)));
}

}  // namespace iomm::vhost
