// iomm-guest-vfio: the real-VFIO checks that run inside the QEMU guest
// (tests/guest/vfio.sh). Static, so the initramfs needs no libraries.
//   iomm-guest-vfio edu BDF GROUP
//   iomm-guest-vfio conformance GROUP FIRST_SEED SEEDS
// Each check prints one marker line (guest_report.hpp); the exit status is
// non-zero if any failed.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace iomm::guest {
int edu_main(const std::string& bdf, int group);
int conformance_main(int group, uint64_t first_seed, uint64_t seeds);
}  // namespace iomm::guest

int main(int argc, char** argv) {
  const std::string cmd = argc > 1 ? argv[1] : "";
  if (cmd == "edu" && argc == 4) return iomm::guest::edu_main(argv[2], std::atoi(argv[3]));
  if (cmd == "conformance" && argc == 5) {
    return iomm::guest::conformance_main(std::atoi(argv[2]), std::strtoull(argv[3], nullptr, 0),
                                         std::strtoull(argv[4], nullptr, 0));
  }
  std::fprintf(stderr, "usage: %s edu BDF GROUP | conformance GROUP FIRST_SEED SEEDS\n", argv[0]);
  return 2;
}
