// iomm-guest-vfio: the real-VFIO checks that run inside the QEMU guest
// (tests/guest/vfio.sh). Static, so the initramfs needs no libraries.
//   iomm-guest-vfio edu BDF GROUP
// Each check prints one marker line (guest_report.hpp); the exit status is
// non-zero if any failed.
#include <cstdio>
#include <cstdlib>
#include <string>

namespace iomm::guest {
int edu_main(const std::string& bdf, int group);
}

int main(int argc, char** argv) {
  const std::string cmd = argc > 1 ? argv[1] : "";
  if (cmd == "edu" && argc == 4) return iomm::guest::edu_main(argv[2], std::atoi(argv[3]));
  std::fprintf(stderr, "usage: %s edu BDF GROUP\n", argv[0]);
  return 2;
}
