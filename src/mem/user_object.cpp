// This process's virtual memory as a backing object. mlock is per address,
// not counted, so all user-memory pins in the process must share one pin
// store: there is exactly one UserObject.
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cstddef>

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

  // The addresses are whatever the caller named: they may be unmapped or
  // read-only now. process_vm_{read,write}v on our own pid reports that as
  // EFAULT with no signal, which catching SIGSEGV could not do reliably next
  // to sanitizers and fuzzers that own that signal.
  bool copy_out(uint64_t offset, void* buf, size_t n) const noexcept override {
    return transfer(buf, offset, n, false);
  }
  bool copy_in(uint64_t offset, const void* buf, size_t n) const noexcept override {
    return transfer(const_cast<void*>(buf), offset, n, true);
  }

 protected:
  Status lock_granules(uint64_t first, uint64_t last, bool write) override {
    return populate_and_lock(reinterpret_cast<void*>(first << kPageShift),
                             (last - first + 1) << kPageShift, write);
  }
  void unlock_granules(uint64_t first, uint64_t last) noexcept override {
    unlock_range(reinterpret_cast<void*>(first << kPageShift), (last - first + 1) << kPageShift);
  }

 private:
  static bool transfer(void* local, uint64_t remote, size_t n, bool write) noexcept {
    const pid_t self = getpid();
    while (n > 0) {
      iovec mine{local, n};
      iovec theirs{reinterpret_cast<void*>(remote), n};
      const ssize_t done = write ? process_vm_writev(self, &mine, 1, &theirs, 1, 0)
                                 : process_vm_readv(self, &mine, 1, &theirs, 1, 0);
      if (done <= 0) return false;
      local = static_cast<std::byte*>(local) + done;
      remote += static_cast<uint64_t>(done);
      n -= static_cast<size_t>(done);
    }
    return true;
  }
};

}  // namespace

std::shared_ptr<MemObject> user_object() {
  static auto* instance = new std::shared_ptr<MemObject>(std::make_shared<UserObject>());
  return *instance;
}

}  // namespace iomm::mem
