// An IOAS over a memfd, a software IOMMU domain doing device DMA into it,
// and a mediated access pinning and reading it back. Exits non-zero, with
// the error, if any step does not do what it should.
#include <iomm/version.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <iomm/access.hpp>
#include <iomm/accounting.hpp>
#include <iomm/domain.hpp>
#include <iomm/ioas.hpp>
#include <iomm/source.hpp>
#include <memory>
#include <string>

namespace {

int fail(const char* step, const iomm::Error& error) {
  std::fprintf(stderr, "%s: %s\n", step, error.describe().c_str());
  return 1;
}

int fail(const char* step) {
  std::fprintf(stderr, "%s\n", step);
  return 1;
}

}  // namespace

int main() {
  std::printf("iomm %s\n", IOMM_VERSION_STRING);
  constexpr uint64_t kSize = 4 << 20;
  const int fd = memfd_create("guest-memory", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0 || ftruncate(fd, kSize) != 0) return fail("memfd");

  // Sealed against shrinking, so the library's mapping cannot lose pages.
  auto guest = iomm::MemorySource::from_file(fd, 0, kSize, iomm::FileSeal::apply);
  if (!guest) return fail("from_file", guest.error());
  auto ioas = iomm::Ioas::create({.account_mode = iomm::AccountMode::per_process});
  if (!ioas) return fail("Ioas::create", ioas.error());
  auto iova = (*ioas)->map(*guest, iomm::kProtRead | iomm::kProtWrite);
  if (!iova) return fail("map", iova.error());

  auto domain = iomm::SoftDomain::create({});
  if (!domain) return fail("SoftDomain::create", domain.error());
  if (auto st = (*ioas)->attach(*domain); !st) return fail("attach", st.error());

  // The device writes into guest memory through its IOMMU domain.
  const char message[] = "written by the device";
  if (auto st = (*domain)->dma_write(*iova + 0x3000, message, sizeof(message)); !st) {
    return fail("dma_write", st.error());
  }
  // An IOVA outside every mapping is an IOMMU fault, not a crash.
  char byte = 0;
  if ((*domain)->dma_read(*iova + kSize, &byte, 1).code() != EFAULT) {
    return fail("dma_read outside the mapping did not fault");
  }

  // A mediated user pins the page and sees the device's bytes.
  bool told_to_unpin = false;
  auto access = iomm::Access::create(*ioas, [&](const iomm::IovaRange&) { told_to_unpin = true; });
  if (!access) return fail("Access::create", access.error());
  auto pinned = (*access)->pin(*iova + 0x3000, iomm::kPageSize, iomm::kProtRead);
  if (!pinned) return fail("pin", pinned.error());
  if (std::memcmp(pinned->front().host, message, sizeof(message)) != 0) {
    return fail("pinned page does not hold the device's write");
  }
  if (auto st = (*access)->unpin(*iova + 0x3000, iomm::kPageSize); !st) {
    return fail("unpin", st.error());
  }

  const iomm::Counters while_mapped = iomm::counters();
  if (while_mapped.pinned_bytes != kSize) return fail("attach should pin the whole mapping");
  auto unmapped = (*ioas)->unmap(*iova, kSize);
  if (!unmapped) return fail("unmap", unmapped.error());
  if (auto st = (*ioas)->detach(*domain); !st) return fail("detach", st.error());
  if (iomm::counters().pinned_bytes != 0 || iomm::counters().charged_bytes != 0) {
    return fail("pages left pinned or charged");
  }
  std::printf("ioas_dma: device wrote \"%s\"; %llu KiB pinned while mapped, 0 after unmap\n",
              message, static_cast<unsigned long long>(while_mapped.pinned_bytes >> 10));
  close(fd);
  return told_to_unpin ? fail("callback ran with no pin held") : 0;
}
