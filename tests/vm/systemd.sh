#!/usr/bin/env bash
# The package under a real systemd: a Debian 12 root filesystem (debootstrap; for arm64
# the second stage runs through qemu-user binfmt) booted under qemu-system, our .deb
# installed with dpkg, the service started at boot by systemd as its own user under the
# hardened unit, `vivid` as its camera (a config.d drop-in), and the classifications
# received on the host through a qemu hostfwd port on 127.0.0.1. A report unit records
# what systemd saw (state, READY, STATUS, watchdog, user, the security score), then:
#   - SIGABRT to the daemon (what a panic ends in: util::panics::abort_on_panic) -> systemd
#     restarts it (Restart=on-failure): a new main PID, NRestarts=1, running again;
#   - a drop-in the daemon refuses (exit 78, EX_CONFIG) -> the unit fails and stays failed
#     (RestartPreventExitStatus=78): a configuration error is not retried in a loop.
# It writes all of that into the image and powers off; the host reads it back (debugfs).
#
#   sudo tests/vm/systemd.sh amd64|arm64 path/to/edgesight_*_ARCH.deb
#
# amd64 boots in ~25 s (TCG; about 3 min in all, after the root filesystem); arm64 emulates a Raspberry Pi-like board (-M virt -cpu cortex-a72, TCG):
# its first run builds the root filesystem (~10 min), every boot ~2-4 min.
# Needs root, debootstrap, qemu-system-x86 or qemu-system-arm (and qemu-user-static with
# binfmt_misc for arm64), e2fsprogs, mosquitto-clients.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/vm/lib.sh
arch=${1:?amd64|arm64}
deb=$(realpath "${2:?edgesight .deb}")
work=target/vm/systemd-$arch
root=$work/rootfs
mkdir -p "$work"
case "$arch" in
    amd64)
        # TCG, not KVM: this machine kind has /dev/kvm, but a guest kernel hangs under it
        # right after decompression (nested virtualisation); TCG boots it in ~25 s.
        qemu=(qemu-system-x86_64 -M q35 -cpu max)
        console=ttyS0
        settle=60
        ;;
    arm64)
        qemu=(qemu-system-aarch64 -M virt -cpu cortex-a72)
        console=ttyAMA0
        settle=90
        ;;
    *) echo "unknown arch $arch" >&2; exit 2 ;;
esac

# --- root filesystem (cached) -------------------------------------------------------------
if [ ! -f "$work/rootfs.done" ]; then
    if [ "$arch" = arm64 ]; then
        [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
        [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
    fi
    rm -rf "$root"
    debootstrap --arch="$arch" --variant=minbase \
        --include=systemd,systemd-sysv,udev,kmod,linux-image-"$arch",iproute2,procps \
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
rm -f "$root/var/log/pi-report.txt" "$root/etc/edgesight/config.d/99-refused.toml"
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
cat > "$root/usr/local/bin/pi-report" <<EOF
#!/bin/sh
show() { systemctl show edgesight -p ActiveState -p SubState -p Result -p NRestarts -p MainPID -p ExecMainStatus; }
sleep $settle
echo "pi-report: begin"
systemctl show edgesight -p Type -p ActiveState -p SubState -p StatusText -p NRestarts \\
    -p WatchdogUSec -p WatchdogTimestamp -p User -p MainPID
ps -o user=,pid=,args= -C edgesight
journalctl -u edgesight --no-pager -o cat | head -25
systemd-analyze security edgesight --no-pager | tail -1
echo "pi-report: abort"
kill -ABRT "\$(systemctl show -p MainPID --value edgesight)"
sleep 20
show | sed 's/^/after-abort: /'
echo "pi-report: refused config"
printf '[mqtt]\nqos = 7\n' > /etc/edgesight/config.d/99-refused.toml
systemctl restart edgesight
sleep 20
show | sed 's/^/after-78: /'
journalctl -u edgesight --no-pager -o cat | grep -E 'ABRT|status=78|mqtt.qos' | head -5
rm /etc/edgesight/config.d/99-refused.toml
echo "pi-report: end"
systemctl poweroff
EOF
chmod +x "$root/usr/local/bin/pi-report"
cat > "$root/etc/systemd/system/pi-report.service" <<'EOF'
[Unit]
Description=report what systemd saw of edgesight, then power off
After=edgesight.service
[Service]
Type=oneshot
StandardOutput=append:/var/log/pi-report.txt
StandardError=append:/var/log/pi-report.txt
ExecStart=/usr/local/bin/pi-report
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
"${qemu[@]}" -smp 2 -m 1024 -nographic -no-reboot \
    -kernel "$root/vmlinuz" -initrd "$root/initrd.img" \
    -append "root=/dev/vda rw console=$console quiet" \
    -drive "file=$img,format=raw,if=virtio" \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:1883" -device virtio-net-pci,netdev=n0 \
    > "$log" 2>&1 &
vm=$!
trap 'kill $vm 2>/dev/null || true' EXIT
echo "booting $arch under systemd (${qemu[*]}); console: $log; MQTT on 127.0.0.1:$port"
t0=$(date +%s)
subscribe_while_running $vm "$port" "$msgs" 1200
kill $vm 2>/dev/null || true
wait $vm 2>/dev/null || true
# debugfs reads the image as it is on disk: let e2fsck replay the journal first, or a
# report still only in the guest's journal reads as empty (seen once).
e2fsck -fy "$img" >/dev/null 2>&1 || true
echo "--- what systemd saw (/var/log/pi-report.txt in the image) ---"
debugfs -R "cat /var/log/pi-report.txt" "$img" 2>/dev/null > "$work/report.txt" || true
cut -c1-220 "$work/report.txt"
echo "--- MQTT on the host ($(wc -l < "$msgs") messages in $(( $(date +%s) - t0 )) s) ---"
grep -m2 '/vivid/classification ' "$msgs" | cut -c1-200 || true
n=$(grep -c '/vivid/classification ' "$msgs" || true)
report=$(cat "$work/report.txt")
ok=1
fail() { echo "FAIL: $1"; ok=0; }
first=$(sed -n '/pi-report: begin/,/pi-report: abort/p' <<<"$report")
grep -q "SubState=running" <<<"$first" || fail "service not running"
grep -q "User=edgesight" <<<"$first" || fail "not running as edgesight"
grep -q "WatchdogTimestamp=[A-Z]" <<<"$first" || fail "no watchdog ping seen"
[ "$n" -gt 0 ] || fail "no classification reached the host"
pid0=$(sed -n 's/^MainPID=//p' <<<"$first" | head -1)
pid1=$(sed -n 's/^after-abort: MainPID=//p' <<<"$report")
grep -q "after-abort: SubState=running" <<<"$report" && grep -q "after-abort: NRestarts=1" <<<"$report" \
    && [ -n "$pid1" ] && [ "$pid1" != "$pid0" ] \
    || fail "SIGABRT (a panic's end) was not followed by a restart (pid $pid0 -> $pid1)"
# A manual restart may reset NRestarts; automatic restarts (every RestartSec=5 s) would
# have raised it past its count after the abort within the 20 s.
r1=$(sed -n 's/^after-abort: NRestarts=//p' <<<"$report")
r2=$(sed -n 's/^after-78: NRestarts=//p' <<<"$report")
grep -q "after-78: ActiveState=failed" <<<"$report" && grep -q "after-78: ExecMainStatus=78" <<<"$report" \
    && [ -n "$r2" ] && [ "$r2" -le "${r1:-0}" ] \
    || fail "exit 78 was restarted ($r1 -> $r2 restarts), or did not fail the unit"
[ $ok = 1 ] && echo "PASS: $arch under systemd: edgesight started (Type=notify) as its own user; $n classification(s) from vivid on the host; restarted after SIGABRT (pid $pid0 -> $pid1); exit 78 left failed, not restarted"
[ $ok = 1 ]
