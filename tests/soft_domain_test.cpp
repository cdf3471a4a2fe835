#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string_view>
#include <thread>
#include <vector>

#include "domain/page_table.hpp"
#include "domain/soft_domain_impl.hpp"
#include "iomm/domain.hpp"
#include "iomm/rcu.hpp"
#include "sync/rcu.hpp"
#include "test_support.hpp"

namespace iomm {
namespace {

constexpr uint32_t kReadWrite = kProtRead | kProtWrite;

std::shared_ptr<SoftDomain> make_domain(const DomainConfig& config = {}) {
  auto domain = SoftDomain::create(config);
  EXPECT_TRUE(domain.ok());
  return std::move(domain).value();
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// Page-aligned host memory standing in for pinned user pages.
class HostPages {
 public:
  explicit HostPages(size_t pages)
      : bytes_(pages * kPageSize),
        memory_(static_cast<std::byte*>(std::aligned_alloc(kPageSize, bytes_))) {
    std::memset(memory_.get(), 0, bytes_);
  }
  [[nodiscard]] std::byte* page(size_t index) const { return memory_.get() + index * kPageSize; }
  [[nodiscard]] uint64_t address(size_t index = 0) const {
    return reinterpret_cast<uint64_t>(page(index));
  }
  [[nodiscard]] size_t bytes() const { return bytes_; }

 private:
  size_t bytes_;
  std::unique_ptr<std::byte, FreeDeleter> memory_;
};

std::vector<std::byte> pattern(size_t length, unsigned seed) {
  std::vector<std::byte> bytes(length);
  for (size_t i = 0; i < length; ++i) bytes[i] = std::byte((i * 131 + seed) & 0xff);
  return bytes;
}

std::vector<std::byte> filled(size_t length, std::byte value) {
  return std::vector<std::byte>(length, value);
}

TEST(SoftDomain, CreateValidatesTheConfig) {
  auto with = [](auto change) {
    DomainConfig config;
    change(config);
    return SoftDomain::create(config).code();
  };
  EXPECT_EQ(with([](DomainConfig&) {}), 0);
  EXPECT_EQ(with([](DomainConfig& c) {
              c.aperture_start = 0x2000;
              c.aperture_last = 0x1fff;
            }),
            EINVAL);
  EXPECT_EQ(with([](DomainConfig& c) { c.min_page_size = 0; }), EINVAL);
  EXPECT_EQ(with([](DomainConfig& c) { c.min_page_size = 2048; }), EINVAL);
  EXPECT_EQ(with([](DomainConfig& c) { c.min_page_size = 3 * kPageSize; }), EINVAL);
  EXPECT_EQ(with([](DomainConfig& c) { c.min_page_size = kPageSize2M; }), 0);
  EXPECT_EQ(with([](DomainConfig& c) { c.page_sizes = kPageSize2M; }), EINVAL);
  EXPECT_EQ(with([](DomainConfig& c) { c.page_sizes = kPageSize | 8192; }), EINVAL);
  EXPECT_EQ(with([](DomainConfig& c) { c.page_sizes = kPageSize; }), 0);
  EXPECT_EQ(with([](DomainConfig& c) {
              c.reserved = {{0xfee00000, 0xfeefffff}, {0x5000, 0x4fff}};
            }),
            EINVAL);
  EXPECT_EQ(with([](DomainConfig& c) { c.reserved = {{0xfee00000, 0xfeefffff}}; }), 0);
  EXPECT_EQ(with([](DomainConfig& c) {
              c.aperture_start = 0;
              c.aperture_last = UINT64_MAX;
            }),
            0);
  EXPECT_EQ(with([](DomainConfig& c) { c.fault_log_capacity = 0; }), 0);
}

TEST(SoftDomain, ConfigIsKept) {
  DomainConfig config;
  config.aperture_start = 0x100000;
  config.reserved = {{0xfee00000, 0xfeefffff}};
  auto domain = make_domain(config);
  EXPECT_EQ(domain->config().aperture_start, 0x100000U);
  EXPECT_EQ(domain->config().reserved, config.reserved);
  EXPECT_EQ(domain::page_table_of(*domain).levels(), 4U);
}

TEST(SoftDomain, FaultReasonNames) {
  EXPECT_EQ(std::string_view(to_string(FaultReason::not_present)), "not_present");
  EXPECT_EQ(std::string_view(to_string(FaultReason::permission)), "permission");
  EXPECT_EQ(std::string_view(to_string(FaultReason::outside_aperture)), "outside_aperture");
  EXPECT_EQ(std::string_view(to_string(FaultReason::host_memory)), "host_memory");
}

TEST(SoftDomain, TranslateReportsTheLeaf) {
  auto domain = make_domain();
  HostPages host(2);
  ASSERT_OK(domain::page_table_of(*domain).map(0x40000, host.address(), 2 * kPageSize, kProtRead,
                                               mem::HostAccess::direct));
  auto translation = domain->translate(0x41010, kProtRead);
  ASSERT_OK(translation);
  EXPECT_EQ(translation->iova, 0x41010U);
  EXPECT_EQ(translation->host, host.page(1) + 0x10);
  EXPECT_EQ(translation->address, host.address(1) + 0x10);
  EXPECT_EQ(translation->prot, uint32_t{kProtRead});
  EXPECT_EQ(translation->leaf_size, kPageSize);
  EXPECT_EQ(translation->contiguous, kPageSize - 0x10);
}

TEST(SoftDomain, TranslateFaults) {
  DomainConfig config;
  config.aperture_start = 0x100000;
  config.aperture_last = 0x1fffff;
  auto domain = make_domain(config);
  HostPages host(1);
  ASSERT_OK(domain::page_table_of(*domain).map(0x100000, host.address(), kPageSize, kProtRead,
                                               mem::HostAccess::direct));

  EXPECT_ERRNO(domain->translate(0x100000, kProtWrite), EPERM);
  EXPECT_ERRNO(domain->translate(0x101000, kProtRead), EFAULT);
  EXPECT_ERRNO(domain->translate(0xff000, kProtRead), EFAULT);
  EXPECT_ERRNO(domain->translate(0x200000, kProtWrite), EFAULT);
  EXPECT_ERRNO(domain->translate(0x100000, 0), EINVAL);

  const std::vector<IommuFault> faults = domain->take_faults();
  ASSERT_EQ(faults.size(), 4U);
  EXPECT_EQ(faults[0].iova, 0x100000U);
  EXPECT_EQ(faults[0].requested, uint32_t{kProtWrite});
  EXPECT_EQ(faults[0].reason, FaultReason::permission);
  EXPECT_EQ(faults[1].iova, 0x101000U);
  EXPECT_EQ(faults[1].reason, FaultReason::not_present);
  EXPECT_EQ(faults[2].iova, 0xff000U);
  EXPECT_EQ(faults[2].reason, FaultReason::outside_aperture);
  EXPECT_EQ(faults[3].iova, 0x200000U);
  EXPECT_EQ(faults[3].requested, uint32_t{kProtWrite});
  EXPECT_EQ(faults[3].reason, FaultReason::outside_aperture);
  EXPECT_TRUE(domain->take_faults().empty());
  EXPECT_EQ(domain->counters().faults, 4U);
}

TEST(SoftDomain, DmaRoundTrip) {
  auto domain = make_domain();
  constexpr size_t kLength = 64 * 1024;
  HostPages host(kLength / kPageSize);
  const uint64_t iova = 0x100000;
  ASSERT_OK(domain::page_table_of(*domain).map(iova, host.address(), kLength, kReadWrite,
                                               mem::HostAccess::direct));

  const std::vector<std::byte> written = pattern(kLength, 7);
  ASSERT_OK(domain->dma_write(iova, written.data(), kLength));
  EXPECT_EQ(std::memcmp(host.page(0), written.data(), kLength), 0);

  std::vector<std::byte> read(kLength);
  ASSERT_OK(domain->dma_read(iova, read.data(), kLength));
  EXPECT_EQ(read, written);

  // Unaligned start and length crossing page boundaries.
  const std::vector<std::byte> patch = pattern(5000, 99);
  ASSERT_OK(domain->dma_write(iova + 4000, patch.data(), patch.size()));
  EXPECT_EQ(std::memcmp(host.page(0) + 4000, patch.data(), patch.size()), 0);
  std::vector<std::byte> read_patch(patch.size());
  ASSERT_OK(domain->dma_read(iova + 4000, read_patch.data(), read_patch.size()));
  EXPECT_EQ(read_patch, patch);
  EXPECT_TRUE(domain->take_faults().empty());
}

TEST(SoftDomain, DmaAcrossScatteredHostPages) {
  auto domain = make_domain();
  // More discontiguous pieces than the on-stack segment list holds.
  constexpr size_t kPages = 80;
  HostPages host(2 * kPages);
  const uint64_t iova = 0x800000;
  for (size_t i = 0; i < kPages; ++i) {
    const size_t host_page = 2 * (kPages - 1 - i);  // reversed, with gaps
    ASSERT_OK(domain::page_table_of(*domain).map(iova + i * kPageSize, host.address(host_page),
                                                 kPageSize, kReadWrite, mem::HostAccess::direct));
  }
  const size_t length = kPages * kPageSize - 100;
  const std::vector<std::byte> written = pattern(length, 3);
  ASSERT_OK(domain->dma_write(iova + 50, written.data(), length));
  EXPECT_EQ(std::memcmp(host.page(2 * (kPages - 1)) + 50, written.data(), kPageSize - 50), 0);
  EXPECT_EQ(std::memcmp(host.page(2 * (kPages - 2)), written.data() + kPageSize - 50, kPageSize),
            0);
  std::vector<std::byte> read(length);
  ASSERT_OK(domain->dma_read(iova + 50, read.data(), length));
  EXPECT_EQ(read, written);
}

TEST(SoftDomain, DmaThroughLargeLeaves) {
  auto domain = make_domain();
  void* raw = std::aligned_alloc(kPageSize2M, 2 * kPageSize2M);
  ASSERT_NE(raw, nullptr);
  const std::unique_ptr<void, FreeDeleter> memory(raw);
  const uint64_t iova = 4 * kPageSize2M;
  ASSERT_OK(domain::page_table_of(*domain).map(
      iova, reinterpret_cast<uint64_t>(raw), 2 * kPageSize2M, kReadWrite, mem::HostAccess::direct));
  ASSERT_EQ(domain->counters().leaves_2m, 2U);
  const std::vector<std::byte> written = pattern(8192, 11);
  ASSERT_OK(domain->dma_write(iova + kPageSize2M - 4096, written.data(), written.size()));
  std::vector<std::byte> read(written.size());
  ASSERT_OK(domain->dma_read(iova + kPageSize2M - 4096, read.data(), read.size()));
  EXPECT_EQ(read, written);
}

TEST(SoftDomain, DmaToUnmappedIovaFaultsAndTouchesNothing) {
  auto domain = make_domain();
  HostPages host(2);
  const uint64_t iova = 0x200000;
  // Only the first of two pages is mapped.
  ASSERT_OK(domain::page_table_of(*domain).map(iova, host.address(), kPageSize, kReadWrite,
                                               mem::HostAccess::direct));
  std::memset(host.page(0), 0x5a, kPageSize);

  std::vector<std::byte> buf = filled(2 * kPageSize, std::byte{0xa5});
  EXPECT_ERRNO(domain->dma_read(iova + 16, buf.data(), buf.size() - 32), EFAULT);
  EXPECT_EQ(buf, filled(2 * kPageSize, std::byte{0xa5}));

  EXPECT_ERRNO(domain->dma_write(iova, buf.data(), buf.size()), EFAULT);
  EXPECT_EQ(std::memcmp(host.page(0), filled(kPageSize, std::byte{0x5a}).data(), kPageSize), 0);

  const std::vector<IommuFault> faults = domain->take_faults();
  ASSERT_EQ(faults.size(), 2U);
  EXPECT_EQ(faults[0].iova, iova + kPageSize);
  EXPECT_EQ(faults[0].requested, uint32_t{kProtRead});
  EXPECT_EQ(faults[0].reason, FaultReason::not_present);
  EXPECT_EQ(faults[1].iova, iova + kPageSize);
  EXPECT_EQ(faults[1].requested, uint32_t{kProtWrite});
  EXPECT_EQ(faults[1].reason, FaultReason::not_present);
}

TEST(SoftDomain, DmaPermissionMismatch) {
  auto domain = make_domain();
  HostPages host(2);
  ASSERT_OK(domain::page_table_of(*domain).map(0x10000, host.address(0), kPageSize, kReadWrite,
                                               mem::HostAccess::direct));
  ASSERT_OK(domain::page_table_of(*domain).map(0x11000, host.address(1), kPageSize, kProtRead,
                                               mem::HostAccess::direct));
  ASSERT_OK(domain::page_table_of(*domain).map(0x12000, host.address(0), kPageSize, kProtWrite,
                                               mem::HostAccess::direct));

  const std::vector<std::byte> data = pattern(2 * kPageSize, 5);
  EXPECT_ERRNO(domain->dma_write(0x10000, data.data(), data.size()), EPERM);
  EXPECT_EQ(std::memcmp(host.page(0), filled(2 * kPageSize, std::byte{0}).data(), 2 * kPageSize),
            0);

  std::vector<std::byte> read(kPageSize);
  EXPECT_TRUE(domain->dma_read(0x11000, read.data(), read.size()).ok());
  EXPECT_ERRNO(domain->dma_read(0x12000, read.data(), read.size()), EPERM);

  const std::vector<IommuFault> faults = domain->take_faults();
  ASSERT_EQ(faults.size(), 2U);
  EXPECT_EQ(faults[0].iova, 0x11000U);
  EXPECT_EQ(faults[0].requested, uint32_t{kProtWrite});
  EXPECT_EQ(faults[0].reason, FaultReason::permission);
  EXPECT_EQ(faults[1].iova, 0x12000U);
  EXPECT_EQ(faults[1].requested, uint32_t{kProtRead});
  EXPECT_EQ(faults[1].reason, FaultReason::permission);
}

TEST(SoftDomain, DmaOutsideTheAperture) {
  DomainConfig config;
  config.aperture_start = 0x100000;
  config.aperture_last = 0x1fffff;
  auto domain = make_domain(config);
  HostPages host(1);
  ASSERT_OK(domain::page_table_of(*domain).map(0x1ff000, host.address(), kPageSize, kReadWrite,
                                               mem::HostAccess::direct));

  std::vector<std::byte> buf = filled(2 * kPageSize, std::byte{1});
  EXPECT_ERRNO(domain->dma_read(0x1ff000, buf.data(), buf.size()), EFAULT);
  EXPECT_EQ(buf, filled(2 * kPageSize, std::byte{1}));
  EXPECT_ERRNO(domain->dma_write(0x1000, buf.data(), 16), EFAULT);

  const std::vector<IommuFault> faults = domain->take_faults();
  ASSERT_EQ(faults.size(), 2U);
  EXPECT_EQ(faults[0].iova, 0x200000U);
  EXPECT_EQ(faults[0].reason, FaultReason::outside_aperture);
  EXPECT_EQ(faults[1].iova, 0x1000U);
  EXPECT_EQ(faults[1].reason, FaultReason::outside_aperture);
}

TEST(SoftDomain, DmaToSimulatedMemory) {
  auto domain = make_domain();
  HostPages host(1);
  ASSERT_OK(domain::page_table_of(*domain).map(0x10000, host.address(), kPageSize, kReadWrite,
                                               mem::HostAccess::direct));
  ASSERT_OK(domain::page_table_of(*domain).map(0x11000, 0x7000000000, kPageSize, kReadWrite,
                                               mem::HostAccess::none));

  std::vector<std::byte> buf = filled(2 * kPageSize, std::byte{9});
  EXPECT_ERRNO(domain->dma_read(0x11000, buf.data(), kPageSize), ENXIO);
  EXPECT_ERRNO(domain->dma_read(0x10000, buf.data(), buf.size()), ENXIO);
  EXPECT_EQ(buf, filled(2 * kPageSize, std::byte{9}));
  EXPECT_ERRNO(domain->dma_write(0x10000, buf.data(), buf.size()), ENXIO);
  EXPECT_EQ(std::memcmp(host.page(0), filled(kPageSize, std::byte{0}).data(), kPageSize), 0);
  EXPECT_TRUE(domain->take_faults().empty());
  EXPECT_EQ(domain->counters().faults, 0U);

  // An IOMMU fault later in the range still wins over simulated memory.
  EXPECT_ERRNO(domain->dma_read(0x11000, buf.data(), 2 * kPageSize), EFAULT);
  ASSERT_EQ(domain->take_faults().size(), 1U);

  auto translation = domain->translate(0x11008, kProtWrite);
  ASSERT_OK(translation);
  EXPECT_EQ(translation->host, nullptr);
  EXPECT_EQ(translation->address, 0x7000000008U);
}

TEST(SoftDomain, DmaLengthEdgeCases) {
  auto domain = make_domain();
  std::byte byte{};
  EXPECT_TRUE(domain->dma_read(0x1000, &byte, 0).ok());
  EXPECT_TRUE(domain->dma_write(UINT64_MAX, &byte, 0).ok());
  std::vector<std::byte> buf(2);
  EXPECT_ERRNO(domain->dma_read(UINT64_MAX, buf.data(), 2), EOVERFLOW);
  EXPECT_ERRNO(domain->dma_write(UINT64_MAX - 1, buf.data(), 3), EOVERFLOW);
  EXPECT_EQ(domain->counters().faults, 0U);
}

TEST(SoftDomain, DmaAtTheTopOfA64BitAperture) {
  DomainConfig config;
  config.aperture_last = UINT64_MAX;
  auto domain = make_domain(config);
  HostPages host(1);
  const uint64_t top_page = 0xFFFFFFFFFFFFF000;
  ASSERT_OK(domain::page_table_of(*domain).map(top_page, host.address(), kPageSize, kReadWrite,
                                               mem::HostAccess::direct));
  const std::vector<std::byte> written = pattern(kPageSize, 1);
  ASSERT_OK(domain->dma_write(top_page, written.data(), kPageSize));
  std::byte last{};
  ASSERT_OK(domain->dma_read(UINT64_MAX, &last, 1));
  EXPECT_EQ(last, written.back());
}

TEST(SoftDomain, FaultLogOverflowCountsDropped) {
  DomainConfig config;
  config.fault_log_capacity = 4;
  auto domain = make_domain(config);
  std::byte byte{};
  for (uint64_t i = 0; i < 6; ++i) {
    EXPECT_ERRNO(domain->dma_read(i * kPageSize, &byte, 1), EFAULT);
  }
  DomainCounters counters = domain->counters();
  EXPECT_EQ(counters.faults, 6U);
  EXPECT_EQ(counters.faults_dropped, 2U);

  std::vector<IommuFault> faults = domain->take_faults();
  ASSERT_EQ(faults.size(), 4U);
  for (uint64_t i = 0; i < 4; ++i) EXPECT_EQ(faults[i].iova, i * kPageSize);

  // Draining makes room again.
  EXPECT_ERRNO(domain->dma_read(0x77000, &byte, 1), EFAULT);
  faults = domain->take_faults();
  ASSERT_EQ(faults.size(), 1U);
  EXPECT_EQ(faults[0].iova, 0x77000U);
  EXPECT_EQ(domain->counters().faults_dropped, 2U);
}

TEST(SoftDomain, NoFaultLogDropsEverything) {
  DomainConfig config;
  config.fault_log_capacity = 0;
  auto domain = make_domain(config);
  EXPECT_ERRNO(domain->translate(0, kProtRead), EFAULT);
  EXPECT_TRUE(domain->take_faults().empty());
  EXPECT_EQ(domain->counters().faults, 1U);
  EXPECT_EQ(domain->counters().faults_dropped, 1U);
}

TEST(SoftDomain, CountersFollowThePageTable) {
  auto domain = make_domain();
  ASSERT_OK(domain::page_table_of(*domain).map(kPageSize1G, kPageSize1G,
                                               kPageSize1G + kPageSize2M + kPageSize, kReadWrite,
                                               mem::HostAccess::direct));
  DomainCounters counters = domain->counters();
  EXPECT_EQ(counters.mapped_bytes, kPageSize1G + kPageSize2M + kPageSize);
  EXPECT_EQ(counters.leaves_1g, 1U);
  EXPECT_EQ(counters.leaves_2m, 1U);
  EXPECT_EQ(counters.leaves_4k, 1U);
  EXPECT_GT(counters.table_pages, 1U);
  domain::page_table_of(*domain).unmap(kPageSize1G, kPageSize1G + kPageSize2M + kPageSize);
  counters = domain->counters();
  EXPECT_EQ(counters.mapped_bytes, 0U);
  EXPECT_EQ(counters.leaves_1g + counters.leaves_2m + counters.leaves_4k, 0U);
}

TEST(SoftDomain, DmaIntoTruncatedFileReturnsEfault) {
  const int fd = memfd_create("iomm-soft-domain-test", 0);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 2 * kPageSize), 0);
  void* mapping = mmap(nullptr, 2 * kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ASSERT_NE(mapping, MAP_FAILED);
  auto domain = make_domain();
  ASSERT_OK(domain::page_table_of(*domain).map(0x10000, reinterpret_cast<uint64_t>(mapping),
                                               2 * kPageSize, kReadWrite, mem::HostAccess::direct));
  std::vector<std::byte> buf(2 * kPageSize);
  ASSERT_OK(domain->dma_read(0x10000, buf.data(), buf.size()));

  ASSERT_EQ(ftruncate(fd, 0), 0);
  EXPECT_ERRNO(domain->dma_read(0x10000, buf.data(), buf.size()), EFAULT);
  EXPECT_ERRNO(domain->dma_write(0x10000 + kPageSize, buf.data(), kPageSize), EFAULT);
  const std::vector<IommuFault> faults = domain->take_faults();
  ASSERT_EQ(faults.size(), 2U);
  EXPECT_EQ(faults[0].iova, 0x10000U);
  EXPECT_EQ(faults[0].requested, uint32_t{kProtRead});
  EXPECT_EQ(faults[0].reason, FaultReason::host_memory);
  EXPECT_EQ(faults[1].iova, 0x10000U + kPageSize);
  EXPECT_EQ(faults[1].requested, uint32_t{kProtWrite});
  EXPECT_EQ(faults[1].reason, FaultReason::host_memory);

  munmap(mapping, 2 * kPageSize);
  close(fd);
}

// Several devices doing DMA while their ranges are mapped and unmapped; the
// ranges interleave page by page so the threads race to install shared
// tables. Meant for ThreadSanitizer as much as for the results.
TEST(SoftDomain, ConcurrentDmaWithMapAndUnmapOfDisjointRanges) {
  constexpr size_t kWorkers = 4;
  constexpr size_t kPagesPerWorker = 4;
  constexpr int kRounds = 10;
  constexpr int kIterations = 40;
  const uint64_t base = 0x40000000 - 2 * kPageSize2M;  // crosses 2 MiB and 1 GiB slots

  for (int round = 0; round < kRounds; ++round) {
    auto domain = make_domain();
    std::atomic<bool> workers_done{false};
    std::atomic<int> failures{0};
    auto iova_of = [&](size_t worker, size_t page) {
      return base + (page * kWorkers + worker) * kPageSize2M / 4;
    };

    std::thread translator([&] {
      while (!workers_done.load(std::memory_order_acquire)) {
        for (size_t worker = 0; worker < kWorkers; ++worker) {
          const RcuReadGuard guard;
          auto translation = domain->translate(iova_of(worker, 0), kProtRead);
          if (!translation.ok() && translation.code() != EFAULT) failures.fetch_add(1);
        }
      }
    });

    std::vector<std::thread> workers;
    for (size_t worker = 0; worker < kWorkers; ++worker) {
      workers.emplace_back([&, worker] {
        HostPages host(kPagesPerWorker);
        const std::vector<std::byte> data = pattern(kPageSize, static_cast<unsigned>(worker));
        std::vector<std::byte> read(kPageSize);
        for (int iteration = 0; iteration < kIterations; ++iteration) {
          for (size_t page = 0; page < kPagesPerWorker; ++page) {
            if (!domain::page_table_of(*domain)
                     .map(iova_of(worker, page), host.address(page), kPageSize, kReadWrite,
                          mem::HostAccess::direct)
                     .ok()) {
              failures.fetch_add(1);
            }
          }
          for (size_t page = 0; page < kPagesPerWorker; ++page) {
            const uint64_t iova = iova_of(worker, page);
            if (!domain->dma_write(iova, data.data(), data.size()).ok() ||
                !domain->dma_read(iova, read.data(), read.size()).ok() || read != data) {
              failures.fetch_add(1);
            }
          }
          for (size_t page = 0; page < kPagesPerWorker; ++page) {
            if (domain::page_table_of(*domain).unmap(iova_of(worker, page), kPageSize) !=
                kPageSize) {
              failures.fetch_add(1);
            }
          }
        }
      });
    }
    for (auto& worker : workers) worker.join();
    workers_done.store(true, std::memory_order_release);
    translator.join();

    EXPECT_EQ(failures.load(), 0);
    EXPECT_EQ(domain->counters().mapped_bytes, 0U);
    EXPECT_EQ(domain->counters().leaves_4k, 0U);
  }
}

// The IOAS unmap protocol: clear the translation, wait for a grace period,
// then reuse the memory. Readers holding a guard must never see the reuse,
// and ThreadSanitizer must see the ordering RCU provides.
TEST(SoftDomain, GracePeriodOrdersReadersBeforeReuse) {
  auto domain = make_domain();
  HostPages host(1);
  auto* plain = reinterpret_cast<uint64_t*>(host.page(0) + 64);
  constexpr uint64_t iova = 0x30000;
  constexpr int kIterations = 50;
  std::atomic<bool> done{false};
  std::atomic<int> stale_reads{0};

  std::vector<std::thread> readers;
  for (int r = 0; r < 2; ++r) {
    readers.emplace_back([&] {
      while (!done.load(std::memory_order_acquire)) {
        const RcuReadGuard guard;
        auto translation = domain->translate(iova + 64, kProtRead);
        if (!translation.ok()) continue;
        // While mapped, the page holds an even number; an odd one would be
        // memory reused before this reader left its section.
        if (*static_cast<const uint64_t*>(translation->host) % 2 != 0) stale_reads.fetch_add(1);
      }
    });
  }
  for (int i = 0; i < kIterations; ++i) {
    *plain = 2 * static_cast<uint64_t>(i);
    ASSERT_OK(domain::page_table_of(*domain).map(iova, host.address(), kPageSize, kProtRead,
                                                 mem::HostAccess::direct));
    std::this_thread::yield();
    domain::page_table_of(*domain).unmap(iova, kPageSize);
    sync::rcu_synchronize();
    *plain = 2 * static_cast<uint64_t>(i) + 1;  // reuse
  }
  done.store(true, std::memory_order_release);
  for (auto& reader : readers) reader.join();
  EXPECT_EQ(stale_reads.load(), 0);
}

}  // namespace
}  // namespace iomm
