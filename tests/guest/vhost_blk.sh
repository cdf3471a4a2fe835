#!/usr/bin/env bash
# iomm's vhost-user-blk back end (`iomm vhost-blk`) driven by QEMU 7.2: a q35
# TCG guest reads the whole disk at two block sizes (sha256 against the
# image), writes a block that must land in the image file and reads it back.
# Twice: with intel-iommu, a strict-mode guest and iommu_platform=on (the
# back end's IOTLB: every ring and buffer address is an IOVA that QEMU
# translates on a miss and invalidates on unmap), and without a vIOMMU
# (guest-physical addresses through the memory table).
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"
guest_require || { guest_report fail vhost_blk "missing:$GUEST_MISSING"; exit 1; }

bin=$GUEST_BUILD/tests/guest/iomm-guest-cli  # the static CLI (target iomm_guest)
if [[ ! -x $bin ]]; then
  guest_report fail vhost_blk "$bin is not built (cmake --build $GUEST_BUILD --target iomm_guest)"
  exit 1
fi
initrd=$GUEST_WORK/vhost_blk.cpio.gz
if ! guest_initramfs "$initrd" "$here/inside/vhost_blk.sh" -- virtio_pci virtio_blk; then
  guest_report fail vhost_blk.initramfs "could not build the initramfs"
  exit 1
fi
image=$GUEST_WORK/vhost_blk.img
head -c "${IOMM_VHOST_IMAGE_MIB:-8}M" /dev/urandom >"$image"
sha=$(sha256sum <"$image" | cut -d' ' -f1)
mem=${GUEST_MEM:-512}
bad=0

run_mode() {
  local mode=$1 append=$2 devprops=$3 name=vhost_blk_$1 sock img backend marker
  shift 3
  sock=$GUEST_WORK/$name.sock
  img=$GUEST_WORK/$name.img
  marker="iomm-vhost-blk-$mode-$RANDOM$RANDOM"
  cp "$image" "$img"
  "$bin" vhost-blk ${IOMM_VHOST_TRACE:+--trace} --socket "$sock" --image "$img" >"$GUEST_WORK/$name.backend.log" 2>&1 &
  backend=$!
  for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.05; done
  guest_boot "$name" "$initrd" 120 "iomm.sha=$sha iomm.marker=$marker $append" \
    "$@" -object memory-backend-memfd,id=mem,size=${mem}M,share=on -numa node,memdev=mem \
    -chardev socket,id=vhost0,path="$sock" \
    -device "vhost-user-blk-pci,chardev=vhost0,num-queues=1$devprops"
  echo "qemu exit status $? ($mode)"
  kill -TERM "$backend"
  if wait "$backend"; then
    guest_report pass "$name.backend_stop"
  else
    guest_report fail "$name.backend_stop" "iomm vhost-blk did not stop cleanly; log:"
    tail -5 "$GUEST_WORK/$name.backend.log" | sed 's/^/    /'
    bad=1
  fi
  if [[ $(dd if="$img" bs=512 skip=8 count=1 2>/dev/null | head -c ${#marker}) == "$marker" ]]; then
    guest_report pass "$name.write_landed"
  else
    guest_report fail "$name.write_landed" "the guest's block is not in the image file"
    bad=1
  fi
  guest_collect "$name" || bad=1
}

# IOMM_VHOST_MODES picks the runs (default both).
for mode in ${IOMM_VHOST_MODES:-iotlb gpa}; do
  case $mode in
    iotlb)
      run_mode iotlb "intel_iommu=on iommu.strict=1" ",disable-legacy=on,iommu_platform=on,ats=on" \
        -device intel-iommu,intremap=on,device-iotlb=on
      ;;
    gpa) run_mode gpa "" "" ;;
  esac
done
exit $bad
