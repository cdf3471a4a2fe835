#!/bin/sh
# Guest side of tests/guest/vhost_blk.sh: the vhost-user-blk disk is
# /dev/vda. Reads it whole at two block sizes and compares the sha256 with
# the image's (iomm.sha= on the command line), writes a marker block and
# reads it back past the page cache.
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
want=$(arg iomm.sha)
marker=$(arg iomm.marker)
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -b /dev/vda ]; then
  echo "IOMM_GUEST_FAIL disk no /dev/vda ($(dmesg | grep -i -E 'virtio|vda' | tail -3 | tr '\n' ' '))"
  exit 1
fi
echo "IOMM_GUEST_PASS disk"
for bs in 4096 1048576; do
  got=$(dd if=/dev/vda bs=$bs 2>/dev/null | sha256sum | cut -d' ' -f1)
  if [ "$got" = "$want" ]; then
    echo "IOMM_GUEST_PASS read_bs$bs"
  else
    echo "IOMM_GUEST_FAIL read_bs$bs sha256 $got, image $want"
  fi
  # The second read must come from the device again, not the page cache.
  echo 3 >/proc/sys/vm/drop_caches
  blockdev --flushbufs /dev/vda
done
printf '%s' "$marker" | dd of=/dev/vda bs=512 seek=8 conv=notrunc,fsync 2>/dev/null &&
  echo "IOMM_GUEST_PASS write" || echo "IOMM_GUEST_FAIL write dd failed"
echo 3 >/proc/sys/vm/drop_caches
blockdev --flushbufs /dev/vda
back=$(dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null | head -c ${#marker})
if [ "$back" = "$marker" ]; then
  echo "IOMM_GUEST_PASS reread"
else
  echo "IOMM_GUEST_FAIL reread read back '$back'"
fi
dmesg | grep -i -E 'DMAR.*fault|virtio_blk|blk_update_request|I/O error' | tail -5
