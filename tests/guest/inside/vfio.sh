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
# The CLI on the real group: the demo's steps on the kernel's container,
# and `iomm stat` showing the kernel's side of the demo while it holds.
/bin/iomm demo --vfio-group "$GROUP" --size 8MiB --hold-seconds 3 >/tmp/demo.out 2>&1 &
demo=$!
sleep 1
/bin/iomm stat --pid "$demo" >/tmp/stat.out 2>&1
if wait $demo && grep -q "all steps checked on the kernel's container" /tmp/demo.out; then
  echo "IOMM_GUEST_PASS cli.demo_vfio_group"
else
  echo "IOMM_GUEST_FAIL cli.demo_vfio_group $(tail -1 /tmp/demo.out)"
  cat /tmp/demo.out
  status=1
fi
if grep -q "kernel VFIO: 1 container(s), group(s) $GROUP;" /tmp/stat.out; then
  echo "IOMM_GUEST_PASS cli.stat_kernel_view"
else
  echo "IOMM_GUEST_FAIL cli.stat_kernel_view $(tr '\n' ' ' </tmp/stat.out)"
  status=1
fi
cat /tmp/demo.out /tmp/stat.out
/bin/iomm-guest-vfio conformance "$GROUP" "$(arg seed)" "$(arg seeds)" || status=1
exit $status
