#!/bin/sh
# Runs inside the guest as /test.sh (tests/guest/vfio.sh): bind QEMU's edu
# device (1234:11e8) to vfio-pci, then run the static test binary.
arg() { sed -n "s/.*iomm\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
BDF=""
for d in /sys/bus/pci/devices/*; do
  [ "$(cat "$d/vendor"):$(cat "$d/device")" = "0x1234:0x11e8" ] && BDF=$(basename "$d")
done
if [ -z "$BDF" ]; then
  echo "IOMM_GUEST_FAIL bind no edu device (1234:11e8) in the guest"
  exit 1
fi
echo vfio-pci >"/sys/bus/pci/devices/$BDF/driver_override"
echo "$BDF" >/sys/bus/pci/drivers_probe
GROUP=$(basename "$(readlink "/sys/bus/pci/devices/$BDF/iommu_group")")
DRIVER=$(basename "$(readlink "/sys/bus/pci/devices/$BDF/driver")")
if [ "$DRIVER" != vfio-pci ] || [ ! -c "/dev/vfio/$GROUP" ]; then
  echo "IOMM_GUEST_FAIL bind edu $BDF: driver '$DRIVER', group '$GROUP', /dev/vfio: $(ls /dev/vfio | tr '\n' ' ')"
  exit 1
fi
echo "IOMM_GUEST_PASS bind"
status=0
/bin/iomm-guest-vfio edu "$BDF" "$GROUP" || status=1
# The DMA after the unmap (edu_test.cpp) faulted in the IOMMU: intel-iommu
# logs it with the device's address.
if dmesg | grep -qE "DMAR: \[DMA Write.*fault addr 0x101000"; then
  echo "IOMM_GUEST_PASS edu.iommu_fault_logged"
else
  echo "IOMM_GUEST_FAIL edu.iommu_fault_logged no DMAR write fault at 0x101000 in dmesg"
  status=1
fi
/bin/iomm-guest-vfio conformance "$GROUP" "$(arg seed)" "$(arg seeds)" || status=1
exit $status
