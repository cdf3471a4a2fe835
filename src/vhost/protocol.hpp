// The vhost-user wire protocol as a back end sees it (QEMU
// docs/interop/vhost-user.rst), and the virtio-blk constants the device
// needs. Every payload is little-endian and fixed-layout; the static_asserts
// pin the sizes the front end puts in the header's size field.
#pragma once

#include <cstdint>
#include <string>

namespace iomm::vhost {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "vhost-user payloads and virtio 1 rings are little-endian");

// Front end -> back end requests.
enum class Request : uint32_t {
  get_features = 1,
  set_features = 2,
  set_owner = 3,
  reset_owner = 4,
  set_mem_table = 5,
  set_log_base = 6,
  set_log_fd = 7,
  set_vring_num = 8,
  set_vring_addr = 9,
  set_vring_base = 10,
  get_vring_base = 11,
  set_vring_kick = 12,
  set_vring_call = 13,
  set_vring_err = 14,
  get_protocol_features = 15,
  set_protocol_features = 16,
  get_queue_num = 17,
  set_vring_enable = 18,
  set_backend_req_fd = 21,
  iotlb_msg = 22,
  get_config = 24,
  set_config = 25,
};

// Back end -> front end requests (on the back-end channel).
inline constexpr uint32_t kBackendIotlbMsg = 1;

inline constexpr uint32_t kFlagVersion = 0x1;
inline constexpr uint32_t kFlagVersionMask = 0x3;
inline constexpr uint32_t kFlagReply = 1U << 2;
inline constexpr uint32_t kFlagNeedReply = 1U << 3;

struct MsgHeader {
  uint32_t request = 0;
  uint32_t flags = 0;
  uint32_t size = 0;
};
static_assert(sizeof(MsgHeader) == 12);

// The largest payload any supported message carries (GET/SET_CONFIG: 12 +
// 256); anything longer is refused before it is read.
inline constexpr uint32_t kMaxPayload = 4096;
// SCM_RIGHTS fds accepted with one message (the memory table's baseline).
inline constexpr unsigned kMaxFds = 8;

struct VringState {
  uint32_t index = 0;
  uint32_t num = 0;
};
static_assert(sizeof(VringState) == 8);

struct VringAddr {
  uint32_t index = 0;
  uint32_t flags = 0;
  uint64_t desc = 0;
  uint64_t used = 0;
  uint64_t avail = 0;
  uint64_t log = 0;
};
static_assert(sizeof(VringAddr) == 40);
inline constexpr uint32_t kVringAddrFLog = 1;

struct MemRegion {
  uint64_t guest_phys_addr = 0;
  uint64_t memory_size = 0;
  uint64_t userspace_addr = 0;
  uint64_t mmap_offset = 0;
};
static_assert(sizeof(MemRegion) == 32);
inline constexpr unsigned kMaxMemRegions = 8;

struct MemTableHeader {
  uint32_t nregions = 0;
  uint32_t padding = 0;
};

// linux/vhost_types.h struct vhost_iotlb_msg (tail padding included).
struct IotlbMsg {
  uint64_t iova = 0;
  uint64_t size = 0;
  uint64_t uaddr = 0;
  uint8_t perm = 0;
  uint8_t type = 0;
  uint8_t padding[6] = {};
};
static_assert(sizeof(IotlbMsg) == 32);
inline constexpr uint8_t kIotlbMiss = 1;
inline constexpr uint8_t kIotlbUpdate = 2;
inline constexpr uint8_t kIotlbInvalidate = 3;
inline constexpr uint8_t kAccessRo = 1;
inline constexpr uint8_t kAccessWo = 2;
inline constexpr uint8_t kAccessRw = 3;

struct ConfigHeader {
  uint32_t offset = 0;
  uint32_t size = 0;
  uint32_t flags = 0;
};
static_assert(sizeof(ConfigHeader) == 12);
inline constexpr uint32_t kMaxConfigSize = 256;

// SET_VRING_KICK/CALL/ERR: queue index in bits 0-7, bit 8 = no fd.
inline constexpr uint64_t kVringIndexMask = 0xff;
inline constexpr uint64_t kVringNoFd = 1ULL << 8;

// Virtio device features.
inline constexpr unsigned kBlkFSizeMax = 1;
inline constexpr unsigned kBlkFSegMax = 2;
inline constexpr unsigned kBlkFRo = 5;
inline constexpr unsigned kBlkFBlkSize = 6;
inline constexpr unsigned kBlkFFlush = 9;
inline constexpr unsigned kBlkFMq = 12;
inline constexpr unsigned kRingFIndirectDesc = 28;
inline constexpr unsigned kRingFEventIdx = 29;
inline constexpr unsigned kUserFProtocolFeatures = 30;
inline constexpr unsigned kFVersion1 = 32;
inline constexpr unsigned kFAccessPlatform = 33;

// Protocol features.
inline constexpr unsigned kProtocolFMq = 0;
inline constexpr unsigned kProtocolFReplyAck = 3;
inline constexpr unsigned kProtocolFBackendReq = 5;
inline constexpr unsigned kProtocolFConfig = 9;

constexpr uint64_t bit(unsigned n) { return 1ULL << n; }

// virtio-blk requests (virtio 1.x, 5.2.6).
struct BlkOutHdr {
  uint32_t type = 0;
  uint32_t ioprio = 0;
  uint64_t sector = 0;
};
static_assert(sizeof(BlkOutHdr) == 16);
inline constexpr uint32_t kBlkTIn = 0;
inline constexpr uint32_t kBlkTOut = 1;
inline constexpr uint32_t kBlkTFlush = 4;
inline constexpr uint32_t kBlkTGetId = 8;
inline constexpr uint8_t kBlkSOk = 0;
inline constexpr uint8_t kBlkSIoerr = 1;
inline constexpr uint8_t kBlkSUnsupp = 2;
inline constexpr uint32_t kBlkIdBytes = 20;
inline constexpr uint64_t kSectorSize = 512;

// Split ring notification flags.
inline constexpr uint16_t kVringAvailFNoInterrupt = 1;
inline constexpr uint16_t kVringUsedFNoNotify = 1;

const char* request_name(uint32_t request) noexcept;
// "0x1f" (for log and error messages).
std::string hex(uint64_t value);

}  // namespace iomm::vhost
