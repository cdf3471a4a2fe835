// iomm: command-line front end of the iomm library.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>

#include "commands.hpp"

namespace {

constexpr const char* kVersion = IOMM_VERSION;  // project(VERSION), from CMake

int run(int argc, char** argv) {
  using namespace iomm::cli;

  CLI::App app{"iomm: user-space I/O memory management (VFIO type1 / iommufd semantics)", "iomm"};
  app.set_version_flag("--version", std::string("iomm ") + kVersion);
  app.require_subcommand(1);

  DemoOptions demo;
  CLI::App* demo_cmd = app.add_subcommand(
      "demo", "Walk through map, pin, charge, DMA and unmap on a memfd standing for guest memory");
  demo_cmd->add_flag("--json", demo.json, "Print the steps as a JSON array");
  demo_cmd->add_option("--size", demo.size, "Guest memory size (e.g. 1GiB, 256MiB)")
      ->transform(CLI::AsSizeValue(false))
      ->default_str("1GiB");
  demo_cmd
      ->add_option("--vfio-group", demo.vfio_group,
                   "Run the steps on this VFIO group (/dev/vfio/N), the kernel's type1 "
                   "container as a domain")
      ->check(CLI::NonNegativeNumber);
  demo_cmd
      ->add_option("--scenario", demo.scenario,
                   "guest: guest memory through map, pin and DMA; devmem: device memory faults, "
                   "memory disable and P2P pool unbind; invalidation: notifiers on real "
                   "events and the ring cache")
      ->check(CLI::IsMember({"guest", "devmem", "invalidation"}))
      ->default_str("guest");
  // Hidden: lets `iomm stat` (and its tests) observe a live process.
  demo_cmd->add_option("--hold-seconds", demo.hold_seconds, "Pause before the final teardown")
      ->group("");

  StatOptions stat;
  CLI::App* stat_cmd =
      app.add_subcommand("stat", "Show the live counters of running iomm processes");
  stat_cmd->add_option("--pid", stat.pid, "Only this process")->check(CLI::PositiveNumber);
  stat_cmd->add_flag("--json", stat.json, "Print JSON");

  VhostBlkOptions vhost;
  CLI::App* vhost_cmd =
      app.add_subcommand("vhost-blk", "Serve a raw image as a vhost-user-blk device");
  vhost_cmd->add_option("--socket", vhost.socket, "Unix socket to listen on")->required();
  vhost_cmd->add_option("--image", vhost.image, "Raw image file")->required();
  vhost_cmd->add_flag("--read-only", vhost.read_only, "Refuse writes (VIRTIO_BLK_F_RO)");
  vhost_cmd->add_option("--num-queues", vhost.num_queues, "Virtqueues")
      ->check(CLI::Range(1, 255))
      ->default_str("1");
  vhost_cmd->add_option("--queue-size", vhost.queue_size, "Largest virtqueue size")
      ->check(CLI::Range(1, 32768))
      ->default_str("256");
  vhost_cmd->add_flag("--trace", vhost.trace, "Log every vhost-user message and IOTLB miss");

  CLI11_PARSE(app, argc, argv);

  if (demo_cmd->parsed()) return run_demo(demo);
  if (vhost_cmd->parsed()) return run_vhost_blk(vhost);
  return run_stat(stat);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "iomm: %s\n", e.what());
  } catch (...) {
    std::fprintf(stderr, "iomm: unexpected error\n");
  }
  return 1;
}
