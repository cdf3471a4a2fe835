// This process's virtual memory as a backing object. mlock is per address,
// not counted, so all user-memory pins in the process must share one pin
// store: there is exactly one UserObject.
#include <sys/mman.h>

#include "mem/mem_object.hpp"
#include "mem/populate.hpp"

namespace iomm::mem {

namespace {

class UserObject final : public MemObject {
 public:
  UserObject() : MemObject(SourceKind::user, kPageShift) {}

  [[nodiscard]] uint64_t dma_address(uint64_t offset) const noexcept override { return offset; }
  [[nodiscard]] void* host(uint64_t offset) const noexcept override {
    return reinterpret_cast<void*>(offset);
  }

 protected:
  Status lock_granules(uint64_t first, uint64_t last, bool write) override {
    return populate_and_lock(reinterpret_cast<void*>(first << kPageShift),
                             (last - first + 1) << kPageShift, write);
  }
  void unlock_granules(uint64_t first, uint64_t last) noexcept override {
    unlock_range(reinterpret_cast<void*>(first << kPageShift), (last - first + 1) << kPageShift);
  }
};

}  // namespace

std::shared_ptr<MemObject> user_object() {
  static auto* instance = new std::shared_ptr<MemObject>(std::make_shared<UserObject>());
  return *instance;
}

}  // namespace iomm::mem
