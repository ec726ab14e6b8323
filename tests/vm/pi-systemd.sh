#!/usr/bin/env bash
# An emulated Raspberry Pi running systemd: a Debian 12 arm64 root filesystem (debootstrap,
# second stage through qemu-user binfmt) booted under qemu-system-aarch64 -M virt -cpu
# cortex-a72, our arm64 .deb installed with dpkg, the service started at boot by systemd as
# its own user under the hardened unit, `vivid` as its camera (a config.d drop-in), and the
# classifications received on the host through a qemu hostfwd port on 127.0.0.1. A report
# unit records what systemd saw (state, READY, STATUS, watchdog, user, the security score)
# in the image, then powers off; the host reads it back with debugfs.
#
#   sudo tests/vm/pi-systemd.sh path/to/edgesight_*_arm64.deb
#
# Slow (TCG): the first run builds the root filesystem (~10 min), every boot ~2-4 min.
# Needs root, debootstrap, qemu-user-static with binfmt_misc, qemu-system-arm, e2fsprogs,
# mosquitto-clients.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/vm/lib.sh
deb=$(realpath "${1:?edgesight arm64 .deb}")
work=target/vm/pi-systemd
root=$work/rootfs
mkdir -p "$work"

# --- root filesystem (cached) -------------------------------------------------------------
if [ ! -f "$work/rootfs.done" ]; then
    [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
    rm -rf "$root"
    debootstrap --arch=arm64 --variant=minbase \
        --include=systemd,systemd-sysv,udev,kmod,linux-image-arm64,iproute2,procps \
        bookworm "$root" http://deb.debian.org/debian
    echo pi > "$root/etc/hostname"
    echo "/dev/vda / ext4 rw 0 1" > "$root/etc/fstab"
    mkdir -p "$root/etc/systemd/network"
    printf '[Match]\nName=en* eth*\n[Network]\nDHCP=yes\n' > "$root/etc/systemd/network/50-dhcp.network"
    chroot "$root" systemctl enable systemd-networkd >/dev/null
    touch "$work/rootfs.done"
fi

# --- this run: the package, the camera, the report ----------------------------------------
cp "$deb" "$root/tmp/edgesight.deb"
chroot "$root" dpkg -i /tmp/edgesight.deb
rm "$root/tmp/edgesight.deb"
# vivid: one instance, video capture node only.
echo vivid > "$root/etc/modules-load.d/vivid.conf"
echo "options vivid n_devs=1 node_types=0x1" > "$root/etc/modprobe.d/vivid.conf"
cat > "$root/etc/edgesight/config.d/50-pi.toml" <<'EOF'
[device]
id = "pi"
[mqtt]
host = "0.0.0.0"
embedded_broker = true
[[camera]]
name = "vivid"
source = "v4l2"
device = "/dev/video0"
width = 320
height = 180
fps = 5
EOF
cat > "$root/etc/systemd/system/pi-report.service" <<'EOF'
[Unit]
Description=report what systemd saw of edgesight, then power off
After=edgesight.service
[Service]
Type=oneshot
StandardOutput=append:/var/log/pi-report.txt
StandardError=append:/var/log/pi-report.txt
ExecStart=/bin/sh -c 'sleep 90; echo "pi-report: begin"; \
  systemctl show edgesight -p Type -p ActiveState -p SubState -p StatusText -p NRestarts -p WatchdogUSec -p WatchdogTimestamp -p User -p MainPID; \
  ps -o user=,pid=,args= -C edgesight; \
  journalctl -u edgesight --no-pager -o cat | head -25; \
  systemd-analyze security edgesight --no-pager | tail -1; \
  echo "pi-report: end"; systemctl stop edgesight; \
  journalctl -u edgesight --no-pager -o cat | tail -4; systemctl poweroff'
[Install]
WantedBy=multi-user.target
EOF
chroot "$root" systemctl enable pi-report.service >/dev/null

# --- image and boot -------------------------------------------------------------------------
img=$work/pi.img
rm -f "$img"
mkfs.ext4 -q -F -d "$root" "$img" 3G
port=$(free_port)
log=$work/console.log
msgs=$work/messages.txt
: > "$msgs"
qemu-system-aarch64 -M virt -cpu cortex-a72 -smp 2 -m 1024 -nographic -no-reboot \
    -kernel "$root/vmlinuz" -initrd "$root/initrd.img" \
    -append "root=/dev/vda rw console=ttyAMA0 quiet" \
    -drive "file=$img,format=raw,if=virtio" \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:1883" -device virtio-net-pci,netdev=n0 \
    > "$log" 2>&1 &
vm=$!
trap 'kill $vm 2>/dev/null || true' EXIT
echo "booting the emulated Pi; console: $log; MQTT on 127.0.0.1:$port"
t0=$(date +%s)
subscribe_while_running $vm "$port" "$msgs" 1200
kill $vm 2>/dev/null || true
echo "--- what systemd saw (/var/log/pi-report.txt in the image) ---"
debugfs -R "cat /var/log/pi-report.txt" "$img" 2>/dev/null > "$work/report.txt" || true
cut -c1-220 "$work/report.txt"
echo "--- MQTT on the host ($(wc -l < "$msgs") messages in $(( $(date +%s) - t0 )) s) ---"
grep -m2 '/vivid/classification ' "$msgs" | cut -c1-200 || true
grep -m1 '/vivid/status ' "$msgs" | cut -c1-200 || true
n=$(grep -c '/vivid/classification ' "$msgs" || true)
report=$(cat "$work/report.txt")
ok=1
grep -q "SubState=running" <<<"$report" || { echo "FAIL: service not running"; ok=0; }
grep -q "User=edgesight" <<<"$report" || { echo "FAIL: not running as edgesight"; ok=0; }
grep -q "WatchdogTimestamp=[A-Z]" <<<"$report" || { echo "FAIL: no watchdog ping seen"; ok=0; }
[ "$n" -gt 0 ] || { echo "FAIL: no classification reached the host"; ok=0; }
[ $ok = 1 ] && echo "PASS: emulated Pi: systemd started edgesight (Type=notify) as its own user; $n classification(s) from vivid on the host"
[ $ok = 1 ]
