# Shared QEMU guest harness: sourced by tests/guest/run.sh and by every
# scenario script (tests/guest/<scenario>.sh). Interface (stable; see
# tests/guest/README.md):
#
#   guest_require                 -> 0 if QEMU, a Debian kernel with modules,
#                                    static busybox, cpio and modprobe are
#                                    here; else 1 with $GUEST_MISSING set
#   guest_initramfs OUT TEST_SCRIPT [SRC:DEST ...] [-- MODULE ...]
#                                 -> busybox initramfs: TEST_SCRIPT becomes
#                                    /test.sh, each SRC is copied to DEST,
#                                    each MODULE (with its dependencies, from
#                                    `modprobe -S $GUEST_KVER --show-depends`)
#                                    is loaded in order before /test.sh runs
#   guest_boot NAME INITRD SECONDS APPEND [QEMU_ARG ...]
#                                 -> boots a q35 TCG guest; the console goes
#                                    to $GUEST_WORK/NAME.log; returns QEMU's
#                                    status (124 after SECONDS: timeout)
#   guest_collect NAME            -> turns the guest's markers in NAME.log
#                                    into results (guest_report); a guest
#                                    that did not reach the end of /init is
#                                    one failure; returns 1 if anything failed
#   guest_report pass|fail|skip NAME [REASON]
#                                 -> records one result (host-side checks)
#   guest_seconds_left            -> seconds until the stage's deadline
#
# Guest side: /test.sh prints one line per check (the marker ends the line;
# whatever the console put before it on the line is ignored):
#   IOMM_GUEST_PASS <name>
#   IOMM_GUEST_FAIL <name> <reason>
#   IOMM_GUEST_SKIP <name> <reason>
# /init prints IOMM_GUEST_DONE <status of /test.sh> when /test.sh returns,
# then powers off.
#
# Environment (set by run.sh; defaults for running a scenario alone):
#   GUEST_WORK     scratch directory (logs, initramfs images)
#   GUEST_RESULTS  file the results are appended to (one line each)
#   GUEST_BUILD    build directory holding the static guest binaries
#   GUEST_DEADLINE epoch second by which the whole stage must be done
#   GUEST_KVER     guest kernel release (default: newest /boot/vmlinuz-*
#                  with modules in /lib/modules)

guest_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${GUEST_WORK:=$(mktemp -d /tmp/iomm-guest.XXXXXX)}"
: "${GUEST_RESULTS:=$GUEST_WORK/results}"
: "${GUEST_BUILD:=$guest_repo/build/default}"
: "${GUEST_DEADLINE:=$(($(date +%s) + 180))}"
mkdir -p "$GUEST_WORK"

guest_find_kernel() {
  local v k
  if [[ -n ${GUEST_KVER:-} ]]; then
    [[ -r /boot/vmlinuz-$GUEST_KVER && -d /lib/modules/$GUEST_KVER ]] && return 0
    return 1
  fi
  for v in $(ls -1 /boot 2>/dev/null | sed -n 's/^vmlinuz-//p' | sort -rV); do
    if [[ -r /boot/vmlinuz-$v && -d /lib/modules/$v/kernel ]]; then
      GUEST_KVER=$v
      return 0
    fi
  done
  return 1
}

guest_require() {
  GUEST_MISSING=""
  command -v qemu-system-x86_64 >/dev/null || GUEST_MISSING+=" qemu-system-x86_64"
  command -v cpio >/dev/null || GUEST_MISSING+=" cpio"
  command -v modprobe >/dev/null || GUEST_MISSING+=" modprobe"
  [[ -x /bin/busybox ]] && ! ldd /bin/busybox >/dev/null 2>&1 || GUEST_MISSING+=" static-busybox"
  guest_find_kernel || GUEST_MISSING+=" guest-kernel(/boot/vmlinuz-*+/lib/modules)"
  [[ -z $GUEST_MISSING ]]
}

guest_seconds_left() { echo $((GUEST_DEADLINE - $(date +%s))); }

guest_report() {
  local kind=$1 name=$2 reason=${3:-}
  echo "$kind $name${reason:+: $reason}" >>"$GUEST_RESULTS"
  case $kind in
    pass) echo "  PASS $name" ;;
    fail) echo "  FAIL $name${reason:+: $reason}" ;;
    skip) echo "  SKIP $name${reason:+: $reason}" ;;
    *) echo "guest_report: unknown kind '$kind'" >&2 && return 1 ;;
  esac
}

# The generic /init: mount, load the listed modules, run /test.sh, power off.
guest_write_init() {
  cat >"$1" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
echo
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /etc/modules.list); do
  insmod "/$m" || echo "IOMM_GUEST_FAIL insmod insmod $m failed"
done
status=1
if [ -x /test.sh ]; then
  /test.sh
  status=$?
fi
echo "IOMM_GUEST_DONE $status"
poweroff -f
EOF
  chmod +x "$1"
}

guest_initramfs() {
  local out=$1 script=$2 root spec src dst m dep kind path rel
  shift 2
  root=$(mktemp -d "$GUEST_WORK/initrd.XXXXXX")
  mkdir -p "$root"/{bin,proc,sys,dev,etc,tmp,mnt}
  cp /bin/busybox "$root/bin/busybox"
  guest_write_init "$root/init"
  cp "$script" "$root/test.sh"
  chmod +x "$root/test.sh"
  while (($#)) && [[ $1 != -- ]]; do
    spec=$1 src=${1%%:*} dst=${1#*:}
    shift
    [[ $spec == *:* && -e $src ]] || { echo "guest_initramfs: bad file '$spec'" >&2; rm -rf "$root"; return 1; }
    mkdir -p "$root/$(dirname "$dst")"
    cp -a "$src" "$root/$dst"
  done
  (($#)) && shift
  : >"$root/etc/modules.list"
  for m in "$@"; do
    if ! dep=$(modprobe -S "$GUEST_KVER" --show-depends "$m" 2>&1); then
      echo "guest_initramfs: module $m: $dep" >&2
      rm -rf "$root"
      return 1
    fi
    while read -r kind path _; do
      [[ $kind == insmod ]] || continue
      rel=${path#/}
      rel=${rel%.xz}
      rel=${rel%.zst}
      grep -qxF "$rel" "$root/etc/modules.list" && continue
      mkdir -p "$root/$(dirname "$rel")"
      case $path in
        *.xz) xz -dc "$path" >"$root/$rel" ;;
        *.zst) zstd -qdc "$path" >"$root/$rel" ;;
        *) cp "$path" "$root/$rel" ;;
      esac
      echo "$rel" >>"$root/etc/modules.list"
    done <<<"$dep"
  done
  (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1 >"$out")
  local status=$?
  rm -rf "$root"
  return $status
}

# no_timer_check: on a loaded host TCG runs so slowly that the kernel's
# check of the timer through the interrupt-remapped IO-APIC fails and it
# panics ("timer doesn't work through Interrupt-remapped IO-APIC").
guest_boot() {
  local name=$1 initrd=$2 seconds=$3 append=$4 left
  shift 4
  left=$(guest_seconds_left)
  ((seconds > left)) && seconds=$left
  if ((seconds <= 0)); then
    echo "guest deadline passed before $name" >"$GUEST_WORK/$name.log"
    return 124
  fi
  timeout --kill-after=5 "$seconds" qemu-system-x86_64 -accel tcg \
    -machine q35,kernel-irqchip=split -m "${GUEST_MEM:-512}" -smp 1 \
    -nographic -no-reboot -nic none \
    -kernel "/boot/vmlinuz-$GUEST_KVER" -initrd "$initrd" \
    -append "console=ttyS0 panic=-1 quiet no_timer_check $append" "$@" </dev/null >"$GUEST_WORK/$name.log" 2>&1
}

guest_collect() {
  local name=$1 log=$GUEST_WORK/$1.log bad=0 kind check reason
  while read -r kind check reason; do
    case $kind in
      IOMM_GUEST_PASS) guest_report pass "$name.$check" ;;
      IOMM_GUEST_FAIL) guest_report fail "$name.$check" "$reason" && bad=1 ;;
      IOMM_GUEST_SKIP) guest_report skip "$name.$check" "$reason" ;;
    esac
  done < <(tr -d '\r' <"$log" | grep -oE 'IOMM_GUEST_(PASS|FAIL|SKIP) .*')
  if ! tr -d '\r' <"$log" | grep -qE 'IOMM_GUEST_DONE '; then
    guest_report fail "$name.boot" "the guest did not finish (timeout or crash); last lines of $log:"
    tail -15 "$log" | sed 's/^/    /'
    bad=1
  fi
  return $bad
}
