#!/usr/bin/env bash
# Real VFIO type1 in a q35 TCG guest with intel-iommu and QEMU's edu device
# bound to vfio-pci: the kernel VFIO domain end to end with edu DMA, then the
# differential conformance run of iomm's type1 layer against the kernel's.
# See tests/guest/README.md.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"
guest_require || { guest_report fail vfio "missing:$GUEST_MISSING"; exit 1; }

bin=$GUEST_BUILD/tests/guest/iomm-guest-vfio
if [[ ! -x $bin || ! -x $GUEST_BUILD/tests/guest/iomm-guest-cli ]]; then
  guest_report fail vfio "$bin is not built (cmake --build $GUEST_BUILD --target iomm_guest)"
  exit 1
fi
# Without their debug info the binaries are a tenth of the size.
strip -o "$GUEST_WORK/iomm-guest-vfio" "$bin" && strip -o "$GUEST_WORK/iomm" "$GUEST_BUILD/tests/guest/iomm-guest-cli" || exit 1
initrd=$GUEST_WORK/vfio.cpio.gz
if ! guest_initramfs "$initrd" "$here/inside/vfio.sh" "$GUEST_WORK/iomm-guest-vfio:/bin/iomm-guest-vfio" "$GUEST_WORK/iomm:/bin/iomm" \
  -- vfio vfio_iommu_type1 vfio-pci; then
  guest_report fail vfio.initramfs "could not build the initramfs"
  exit 1
fi
# Conformance seeds: how many sequences, and the first seed (IOMM_GUEST_SEED
# replays one). Passed on the kernel command line, read by inside/vfio.sh.
seeds=${IOMM_GUEST_SEEDS:-200}
seed=${IOMM_GUEST_SEED:-$((RANDOM * 32768 + RANDOM))}
# The conformance run stops early to leave the boot, the edu checks and the
# scenarios after this one their time (vhost_blk's two boots take about
# 55 s on a loaded machine): at most 60 s, and 60 s less than what the stage
# has left.
left=$(guest_seconds_left)
budget=$((left - 60 < 60 ? left - 60 : 60))
((budget < 10)) && budget=10
echo "conformance: $seeds sequences from seed $seed, at most $budget s"
guest_boot vfio "$initrd" 150 "intel_iommu=on iomm.seed=$seed iomm.seeds=$seeds iomm.seconds=$budget" \
  -device intel-iommu,intremap=on,caching-mode=on -device edu
echo "qemu exit status $?"
guest_collect vfio
