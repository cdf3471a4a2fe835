// The consumer <-> owner protocol on a SOCK_SEQPACKET unix socket: one
// fixed-size message per packet, a descriptor (the consumer's userfaultfd,
// or the region's memfd) passed with SCM_RIGHTS, and the sender's pid taken
// from SCM_CREDENTIALS (the owner sets SO_PASSCRED, so the kernel vouches
// for it).
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>

namespace iomm::devmem::wire {

inline constexpr uint32_t kMagic = 0x696f6d64;  // "iomd"

enum Op : uint32_t { kMap = 1, kUnmap = 2, kExport = 3 };

struct Request {
  uint32_t magic = kMagic;
  uint32_t op = 0;
  uint64_t id = 0;  // kUnmap
  uint64_t address = 0;
  uint64_t offset = 0;
  uint64_t length = 0;  // kExport: region size
  uint64_t features = 0;
};

struct Reply {
  uint32_t magic = kMagic;
  int32_t error = 0;  // errno, 0 on success
  uint64_t id = 0;
  char message[240] = {};
};

// Send one packet, with fd attached unless it is -1. False with errno set.
bool send_packet(int socket, const void* data, size_t length, int fd) noexcept;
// Receive one packet of exactly `length` bytes. *fd gets a passed
// descriptor or -1, *pid the sender's pid (0 if the kernel sent none).
// Returns 0 on success, -1 on a hang-up or short packet (errno), or the
// errno of a failed recvmsg.
int recv_packet(int socket, void* data, size_t length, int* fd, pid_t* pid) noexcept;

}  // namespace iomm::devmem::wire
