#include "ioas_sequence/model.hpp"

namespace iomm::fuzz::ioas_sequence {

namespace {

int make_memfd(const char* name, uint64_t size) {
  // Sealed against shrinking: MemorySource::from_file refuses it otherwise.
  const int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0 || ftruncate(fd, static_cast<off_t>(size)) != 0 ||
      fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) != 0) {
    std::perror("memfd");
    std::abort();
  }
  return fd;
}

}  // namespace

void setup_fixtures() {
  fx = new Fixtures();
  fx->charged = iomm::fuzz::drop_ipc_lock();
  struct rlimit rl {};
  getrlimit(RLIMIT_MEMLOCK, &rl);
  fx->rlimit = rl.rlim_cur;
  fx->file_rw_fd = make_memfd("iomm-fuzz-rw", fx->file_rw_size);
  const int ro_backing = make_memfd("iomm-fuzz-ro", fx->file_ro_size);
  const std::string path = "/proc/self/fd/" + std::to_string(ro_backing);
  fx->file_ro_fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fx->file_ro_fd < 0) std::abort();
  close(ro_backing);
  fx->file_rw_whole = MemorySource::from_file(fx->file_rw_fd, 0, fx->file_rw_size).value();
  fx->file_ro_whole = MemorySource::from_file(fx->file_ro_fd, 0, fx->file_ro_size).value();
  for (auto& s : fx->sim) s = MemorySource::simulated(fx->sim_size).value();
  void* p =
      mmap(nullptr, fx->user_total(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) std::abort();
  fx->user = static_cast<uint8_t*>(p);
  std::memset(fx->user, 0x5a, fx->user_rw + fx->user_ro);
  mprotect(fx->user + fx->user_rw, fx->user_ro, PROT_READ);
  mprotect(fx->user + fx->user_rw + fx->user_ro, fx->user_none, PROT_NONE);
}

IoasModel::~IoasModel() {
  ioas.reset();  // unmaps everything and detaches every domain
  for (auto& d : domains) d->attached = nullptr;
}

uint64_t IoasModel::alignment() const {
  uint64_t a = 1;
  for (const auto& d : domains) a = std::max(a, d->cfg.min_page_size);
  if (accesses > 0) a = std::max(a, kPageSize);
  return a;
}

std::vector<IovaRange> IoasModel::reserved() const {
  std::vector<IovaRange> out = user_reserved;
  for (const auto& d : domains) {
    for (const IovaRange& r : d->reservations()) out.push_back(r);
  }
  return out;
}

}  // namespace iomm::fuzz::ioas_sequence
