#!/usr/bin/env bash
# tests/vm/vm.sh - corecap's VM test tier: a throwaway Debian trixie guest (13: systemd 257,
# kernel 6.12) with systemd as PID 1 and pure cgroup v2, booted under QEMU, with this checkout
# read-only at /mnt/src (9p). trixie, not bookworm: the cgroup2 backend's unit needs systemd
# >= 254 (DelegateSubgroup=), and bookworm has 252.
#
#   tests/vm/vm.sh build        # debootstrap + kernel -> raw ext4 image, cached by recipe hash
#   tests/vm/vm.sh run 'CMD'    # boot, run CMD (sh) as root in the guest, power off
#   tests/vm/vm.sh shell        # serial console, autologin root (Ctrl-A X quits)
#
# Exit codes: run gives CMD's; 77 = this machine cannot do it (the reason is the last line on
# stderr: not root, apt unavailable, Debian mirror unreachable, no usable QEMU); 125 = the VM
# failed or ran out of its time budget (below). A guest kernel panic before the command
# finished gets one more boot (run(), below). Needs root. Host tools (qemu-system-x86,
# debootstrap) are installed with apt-get when missing.
#
# Time budget: it follows progress, not one wall for all (machines differ 2x in speed here, and
# a loaded one took 300 s for 42% of the guest suite). A run is ended, with the reason, when
#   - the guest has not started the command CORECAP_VM_BOOT_TIMEOUT s after QEMU started (300),
#   - the command has printed nothing for CORECAP_VM_STALL_TIMEOUT s (600): the guest pytest
#     prints a line per test, so this is a bound per test, above the guest's own per-test
#     timeout (pytest-timeout, which names the test and shows where it hung),
#   - or the whole boot-run-poweroff passed CORECAP_VM_TIMEOUT s (3600), a backstop only
#     (per boot).
# Other settings: CORECAP_VM_DIR (cache, default /var/tmp/corecap-vm), CORECAP_VM_ACCEL
# (auto|kvm|tcg), CORECAP_VM_SMP (2), CORECAP_VM_MEM (MiB, 2048), CORECAP_VM_MIRROR,
# CORECAP_VM_SRC (the shared checkout), CORECAP_VM_FILES (host files, space-separated, that
# `run` puts in the guest's /mnt/ctl: the Debian package tests/test_vm.py built).
# Files are written only in the cache dir and in temp dirs under it; every process started
# here (debootstrap, qemu) is ended on exit, failure, timeout or signal.
set -euo pipefail

VMDIR=${CORECAP_VM_DIR:-/var/tmp/corecap-vm}
TIMEOUT=${CORECAP_VM_TIMEOUT:-3600}
BOOT_TIMEOUT=${CORECAP_VM_BOOT_TIMEOUT:-300}
STALL_TIMEOUT=${CORECAP_VM_STALL_TIMEOUT:-600}
SMP=${CORECAP_VM_SMP:-2}
MEM=${CORECAP_VM_MEM:-2048}
MIRROR=${CORECAP_VM_MIRROR:-http://deb.debian.org/debian}
SRC=${CORECAP_VM_SRC:-$(cd "$(dirname "$0")/../.." && pwd)}
SUITE=trixie
IMG_SIZE=2G
# systemd/dbus/udev: a real init; python3-*: what corecapd and the guest-side tests import.
PKGS=systemd,systemd-sysv,dbus,udev,iproute2,kmod,procps,initramfs-tools,linux-image-amd64
PKGS+=,python3,python3-pytest,python3-pytest-timeout,python3-regex,python3-psutil,python3-systemd,python3-dbus,python3-jeepney
# The Debian package's Depends (debian/control), so that `apt install ./corecap_*.deb` finds
# them installed (the guest has no network); man-db: `man -w` (guest_deb.py).
deb_depends() {
  awk '/^Depends:/ {d = 1; next} d && /^ / {print; next} {d = 0}' "$SRC/debian/control" 2>/dev/null |
    tr -d ' ,' | grep -v '^\$' | paste -sd, -
}
DEB_DEPENDS=$(deb_depends || true)
PKGS+=,man-db${DEB_DEPENDS:+,$DEB_DEPENDS}
PKGS=$(tr , '\n' <<<"$PKGS" | awk '!seen[$0]++' | paste -sd, -)

log() { echo "[vm $(date +%T)] $*" >&2; }
skip() { echo "VM tier cannot run here: $*" >&2; exit 77; }

CHILD=''      # the process group of the one long-running child (debootstrap, qemu)
TMP_DIRS=()
cleanup() {
  local rc=$? d
  trap - EXIT INT TERM HUP
  if [[ -n $CHILD ]] && kill -TERM -- "-$CHILD" 2>/dev/null; then
    for _ in $(seq 50); do kill -0 -- "-$CHILD" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$CHILD" 2>/dev/null || true
    wait "$CHILD" 2>/dev/null || true
  fi
  for d in "${TMP_DIRS[@]}"; do
    # debootstrap killed midway can leave proc/sys mounted in the rootfs
    awk -v p="$d/" 'index($2, p) == 1 {print $2}' /proc/self/mounts | sort -r |
      while read -r m; do umount -l "$m" || true; done
    rm -rf --one-file-system "$d"
  done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# Run "$@" in its own process group and wait; the trap ends the whole group.
bg_wait() {
  local rc=0
  setsid -w "$@" &
  CHILD=$!
  wait "$CHILD" || rc=$?
  CHILD=''
  return "$rc"
}

host_tools() {
  [[ $(id -u) == 0 ]] || skip "needs root (debootstrap, chroot, mkfs, qemu)"
  local missing=()
  command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
  ((${#missing[@]})) || return 0
  command -v apt-get >/dev/null || skip "apt-get unavailable to install ${missing[*]}"
  mkdir -p "$VMDIR"
  log "installing ${missing[*]} with apt-get"
  apt-get update -qq >"$VMDIR/apt.log" 2>&1 || skip "apt-get update failed (see $VMDIR/apt.log)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=300 "${missing[@]}" >>"$VMDIR/apt.log" 2>&1 ||
    skip "apt-get install ${missing[*]} failed (see $VMDIR/apt.log)"
}

mirror_reachable() { wget -q --spider -T 20 -t 2 "$MIRROR/dists/$SUITE/Release"; }

# The recipe. Its text (with PKGS, SUITE, IMG_SIZE) is the cache key: edit it, and the next
# build makes a new image. $1 = an empty work dir; leaves disk.img, vmlinuz, initrd.img in $1/out.
build_image() {
  local R=$1/rootfs O=$1/out KVER
  mkdir -p "$O" "$VMDIR/debs"
  log "debootstrap $SUITE (about 2 minutes)"
  if ! bg_wait debootstrap --variant=minbase --cache-dir="$VMDIR/debs" --include="$PKGS" \
      "$SUITE" "$R" "$MIRROR" >"$1/debootstrap.log" 2>&1; then
    mirror_reachable || skip "debootstrap failed: the Debian mirror $MIRROR is unreachable"
    tail -n 20 "$1/debootstrap.log" >&2
    log "debootstrap failed"
    return 1
  fi
  echo corecap-vm >"$R/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 corecap-vm\n' >"$R/etc/hosts"
  echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' >"$R/etc/fstab"
  touch "$R/etc/corecap-vm-guest"   # guest-side tests refuse to run anywhere else
  chroot "$R" passwd -d root >/dev/null
  mkdir -p "$R/etc/systemd/system/serial-getty@ttyS0.service.d" "$R/mnt/ctl" "$R/mnt/src"
  cat >"$R/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty -o '-p -f -- \\u' --noclear --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM
EOF
  # nothing periodic that could disturb tests
  for u in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
           fstrim.timer e2scrub_reap.service; do ln -sf /dev/null "$R/etc/systemd/system/$u"; done
  # the runner: mount the shares, wait for boot to finish, run /mnt/ctl/run.sh, record rc
  cat >"$R/usr/local/sbin/vmtest-run" <<'EOF'
#!/bin/sh
o=trans=virtio,version=9p2000.L,msize=1048576
mount -t 9p -o $o ctl /mnt/ctl || { echo "vmtest: no ctl share" >&2; exit 0; }
mount -t 9p -o ro,$o src /mnt/src || echo "vmtest: no src share" >&2
[ -f /mnt/ctl/run.sh ] || exit 0
timeout 120 systemctl is-system-running --wait >/dev/null
echo >/mnt/ctl/started   # its mtime (host clock) marks the start
cd /mnt/src && sh /mnt/ctl/run.sh >/mnt/ctl/run.log 2>&1 </dev/null
echo $? >/mnt/ctl/rc
sync
EOF
  chmod 755 "$R/usr/local/sbin/vmtest-run"
  # Type=exec: a oneshot waiting for is-system-running would deadlock the boot
  cat >"$R/etc/systemd/system/vmtest.service" <<'EOF'
[Unit]
Description=Run /mnt/ctl/run.sh from the 9p share, then power off
After=basic.target dbus.service systemd-logind.service systemd-journald.service
ConditionKernelCommandLine=!vmtest.interactive
SuccessAction=poweroff
FailureAction=poweroff
[Service]
Type=exec
Environment=HOME=/root
ExecStart=/usr/local/sbin/vmtest-run
StandardOutput=journal+console
[Install]
WantedBy=multi-user.target
EOF
  ln -sf /etc/systemd/system/vmtest.service \
    "$R/etc/systemd/system/multi-user.target.wants/vmtest.service"
  # a small initrd: what finds the root fs, plus 9p
  sed -i 's/^MODULES=.*/MODULES=list/' "$R/etc/initramfs-tools/initramfs.conf"
  printf '%s\n' virtio_pci virtio_blk ext4 9pnet_virtio 9p >>"$R/etc/initramfs-tools/modules"
  KVER=$(ls "$R/lib/modules" | head -1)
  # hardware modules a VM never needs (~200 MB)
  (cd "$R/lib/modules/$KVER/kernel" && rm -rf sound drivers/gpu drivers/media drivers/infiniband \
    drivers/iio drivers/staging drivers/usb drivers/hwmon drivers/net/wireless \
    drivers/net/ethernet drivers/bluetooth net/wireless net/bluetooth net/mac80211)
  chroot "$R" depmod -a "$KVER"
  chroot "$R" update-initramfs -u -k "$KVER" >/dev/null
  rm -f "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/*_Packages
  cp "$R/boot/vmlinuz-$KVER" "$O/vmlinuz"
  cp "$R/boot/initrd.img-$KVER" "$O/initrd.img"
  truncate -s "$IMG_SIZE" "$O/disk.img"
  mkfs.ext4 -q -F -L corecap-root -d "$R" "$O/disk.img"
}

recipe_key() {
  { declare -f build_image; echo "$SUITE $IMG_SIZE $PKGS"; } | sha256sum | cut -c1-16
}

build() {  # sets IMAGE to the cached image's dir, building it first when needed
  host_tools
  IMAGE=$VMDIR/images/$(recipe_key)
  [[ -f $IMAGE/ok ]] && { log "image cached: $IMAGE"; return 0; }
  mkdir -p "$VMDIR/images"
  exec 9>"$VMDIR/build.lock"
  flock -w 1200 9 || { log "another build holds $VMDIR/build.lock"; return 1; }
  [[ -f $IMAGE/ok ]] && { log "image cached: $IMAGE (built meanwhile)"; exec 9>&-; return 0; }
  mirror_reachable || skip "cannot reach the Debian mirror $MIRROR to build the image"
  local work t0=$SECONDS old
  work=$(mktemp -d "$VMDIR/build.XXXXXX")
  TMP_DIRS+=("$work")
  build_image "$work"
  rm -rf "$IMAGE"
  mv "$work/out" "$IMAGE"
  touch "$IMAGE/ok"
  for old in "$VMDIR"/images/*; do [[ $old == "$IMAGE" ]] || rm -rf "$old"; done
  log "built $IMAGE in $((SECONDS - t0)) s ($(du -h "$IMAGE/disk.img" | cut -f1) on disk)"
  exec 9>&-
}

ACCEL=()
pick_accel() {  # KVM only when a hardware KVM module is loaded and QEMU can use it, else TCG
  local mode=${CORECAP_VM_ACCEL:-auto} cpu
  if [[ $mode == auto ]]; then
    mode=tcg
    [[ -w /dev/kvm && (-d /sys/module/kvm_intel || -d /sys/module/kvm_amd) ]] && mode=kvm
  fi
  if [[ $mode == kvm ]]; then
    # "-cpu host" can fail with "failed to set MSR 0x10a" under nesting
    for cpu in host host,-arch-capabilities; do
      if echo quit | timeout 30 qemu-system-x86_64 -accel kvm -cpu "$cpu" -display none \
          -nodefaults -S -monitor stdio >/dev/null 2>&1; then
        ACCEL=(-accel kvm -cpu "$cpu")
        return
      fi
    done
    log "KVM unusable, using TCG"
  fi
  qemu-system-x86_64 -accel help 2>/dev/null | grep -qx tcg ||
    skip "no usable KVM and this qemu-system-x86_64 has no TCG"
  # qemu64 boots fastest under TCG; it has no AVX (no TensorFlow in the guest). One TCG thread
  # for both vCPUs: with thread=multi (QEMU 7.2 here) 2 of 5 trixie guest runs stalled; the one
  # console kept shows a panic ("Oops: int3" at a static branch in get_page_from_freelist, likely
  # cpusets_enabled, which flips as the tests make the first cpuset cgroup and remove the last):
  # a vCPU ran stale code across the kernel's int3-based live patching. Costs about 35 s of a
  # 100 s guest suite.
  ACCEL=(-accel tcg,thread=single,tb-size=256 -cpu qemu64)
}

qemu_cmd() {  # $1 = control share dir, $2 = extra kernel args -> QEMU
  pick_accel
  # panic=-1: a guest kernel panic ends QEMU at once (-no-reboot), not at a time budget
  QEMU=(qemu-system-x86_64 "${ACCEL[@]}" -machine q35 -nodefaults -smp "$SMP" -m "$MEM"
    -no-reboot -nic none -kernel "$IMAGE/vmlinuz" -initrd "$IMAGE/initrd.img"
    -append "root=/dev/vda rw console=ttyS0 systemd.unified_cgroup_hierarchy=1 quiet mitigations=off panic=-1 $2"
    -drive "file=$IMAGE/disk.img,if=virtio,format=raw,snapshot=on"
    -virtfs "local,path=$1,mount_tag=ctl,security_model=none,id=ctl"
    -virtfs "local,path=$SRC,mount_tag=src,security_model=none,id=src,readonly=on")
}

# Whether process $1 runs: it exists and is no zombie waiting to be reaped.
running() { [[ $(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1) =~ ^[RSDT]$ ]]; }

# Watch the running VM ($1 = its process group, $2 = the control share) and end it when it
# stops making progress; prints why on stdout. Progress: the guest started the command (the
# file "started"), then the command's output (run.log) grows.
watch_progress() {
  local pgid=$1 ctl=$2 t0=$SECONDS size=-1 grown=$SECONDS now last
  # the group's leader is setsid -w, which waits for QEMU
  while running "$pgid"; do
    sleep 2
    now=$SECONDS
    if ((now - t0 > TIMEOUT)); then
      echo "the whole run passed CORECAP_VM_TIMEOUT=${TIMEOUT} s"
    elif [[ ! -f $ctl/started ]]; then
      ((now - t0 > BOOT_TIMEOUT)) || continue
      echo "the guest did not start the command within CORECAP_VM_BOOT_TIMEOUT=${BOOT_TIMEOUT} s of boot"
    else
      last=$(stat -c %s "$ctl/run.log" 2>/dev/null || echo 0)
      if [[ $last != "$size" ]]; then size=$last grown=$now; continue; fi
      ((now - grown > STALL_TIMEOUT)) || continue
      echo "the command printed nothing for CORECAP_VM_STALL_TIMEOUT=${STALL_TIMEOUT} s; its last line: $(tail -n 1 "$ctl/run.log" 2>/dev/null)"
    fi
    kill -TERM -- "-$pgid" 2>/dev/null
    for _ in $(seq 50); do running "$pgid" || return 0; sleep 0.1; done
    kill -KILL -- "-$pgid" 2>/dev/null
    return 0
  done
}

# One boot, running the command in $1/ctl/run.sh (the guest's /mnt/ctl). Prints the command's
# output, logs the timings; sets BOOT_WHY (why the watchdog ended it, or empty).
BOOT_WHY=''
boot() {
  local dir=$1 rc=0 t0 t1 started
  qemu_cmd "$dir/ctl" ''
  log "boot [${ACCEL[*]}, -smp $SMP]; budget: boot ${BOOT_TIMEOUT} s, silence ${STALL_TIMEOUT} s, all ${TIMEOUT} s"
  t0=$(date +%s.%N)
  # the disk snapshot's overlay goes to TMPDIR: our run dir
  setsid -w env TMPDIR="$dir" "${QEMU[@]}" -display none \
    -monitor none -serial "file:$dir/console.log" </dev/null &
  CHILD=$!
  BOOT_WHY=$(watch_progress "$CHILD" "$dir/ctl")
  wait "$CHILD" || rc=$?
  CHILD=''
  t1=$(date +%s.%N)
  cp "$dir/console.log" "$VMDIR/last-console.log" 2>/dev/null || true
  [[ -f $dir/ctl/run.log ]] && cat "$dir/ctl/run.log"
  started=$(stat -c %.9Y "$dir/ctl/started" 2>/dev/null || echo "$t1")
  log "$(awk -v a="$t0" -v s="$started" -v b="$t1" 'BEGIN {
    printf "boot->command %.1f s, command->poweroff %.1f s, total %.1f s", s-a, b-s, b-a}')"
  [[ -n $BOOT_WHY || -f $dir/ctl/rc ]] ||
    log "qemu exited $rc before the command finished"
}

# Boots at most twice: a second time only when the guest kernel panicked before the command
# finished. Under TCG the trixie guest kernel has panicked with nothing of ours in the trace
# (CI, 2026-12-01: "Fatal exception in interrupt" in __kmalloc_node_noprof, 4 s into the guest
# pytest's collection, before any test ran; EFLAGS fffa57c2, corrupt, points at the emulator):
# no test's fault, and a whole CI run lost to it. Each boot is fresh (snapshot=on disk, new
# control dir). Any other end, a test's failure, a hang or a budget, is the run's result at once.
run() {  # $1 = shell command(s), run as root in the guest from /mnt/src
  build
  local dir try f
  for try in 1 2; do
    dir=$(mktemp -d "$VMDIR/run.XXXXXX")
    TMP_DIRS+=("$dir")
    mkdir "$dir/ctl"
    printf '%s\n' "$1" >"$dir/ctl/run.sh"
    for f in ${CORECAP_VM_FILES:-}; do cp "$f" "$dir/ctl/"; done
    boot "$dir"
    if [[ -n $BOOT_WHY ]]; then
      log "ended: $BOOT_WHY; console: $VMDIR/last-console.log"
      return 125
    fi
    [[ -f $dir/ctl/rc ]] && return "$(cat "$dir/ctl/rc")"
    tail -n 30 "$dir/console.log" >&2 || true
    if ((try == 1)) && grep -q 'Kernel panic - not syncing' "$dir/console.log" 2>/dev/null; then
      cp "$dir/console.log" "$VMDIR/panic-console.log"
      log "the guest kernel panicked (console: $VMDIR/panic-console.log); booting once more"
      echo "--- boot 2 (after a guest kernel panic) ---"
      continue
    fi
    log "console: $VMDIR/last-console.log"
    return 125
  done
}

# Sourced (tests/test_vm.py tests the watchdog and run() with a stand-in QEMU): the functions only.
[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0

case ${1:-} in
  build) build ;;
  run) [[ $# == 2 ]] || { echo "usage: $0 run 'CMD'" >&2; exit 2; }; run "$2" ;;
  shell)
    build
    dir=$(mktemp -d "$VMDIR/run.XXXXXX")
    TMP_DIRS+=("$dir")
    qemu_cmd "$dir" vmtest.interactive
    env TMPDIR="$dir" "${QEMU[@]}" -nographic -serial mon:stdio
    ;;
  *) sed -n '2,8p' "$0" >&2; exit 2 ;;
esac
