#!/usr/bin/env bash
# Boot Debian's kernel under qemu-system with a busybox initramfs, load the `vivid` V4L2
# driver (a real camera driver, no camera needed), run edgesight from /dev/video0 with its
# embedded broker, and check from the host, through a qemu hostfwd port bound to
# 127.0.0.1, that classifications arrive over MQTT.
#
#   tests/vm/run.sh ARCH BINARY [MESSAGES]
#     ARCH     arm64 (an emulated Raspberry Pi: -M virt -cpu cortex-a72) or amd64
#     BINARY   edgesight built for ARCH
#     MESSAGES classification messages to wait for (default 5)
#
# Everything comes from Debian's archive (kernel, busybox-static, qemu-system). Work files
# are kept in target/vm/ARCH so a second run starts at once. Needs: qemu-system-arm or
# qemu-system-x86, kmod (depmod), cpio, mosquitto-clients; for arm64 also the arm64 cross
# libc (libc6-dev-arm64-cross) and `dpkg --add-architecture arm64`.
set -euo pipefail
cd "$(dirname "$0")/../.."
arch=${1:?arm64|amd64}
bin=$(realpath "${2:?edgesight binary}")
want=${3:-5}
work=target/vm/$arch
mkdir -p "$work"

case "$arch" in
    arm64)
        qemu=(qemu-system-aarch64 -M virt -cpu cortex-a72 -smp 2)
        console=ttyAMA0
        libdir=/usr/aarch64-linux-gnu/lib
        strip=aarch64-linux-gnu-strip
        ;;
    amd64)
        qemu=(qemu-system-x86_64 -cpu max -smp 2)
        console=ttyS0
        libdir=/lib/x86_64-linux-gnu
        strip=strip
        ;;
    *) echo "unknown arch $arch" >&2; exit 2 ;;
esac

# --- kernel, modules and busybox from Debian's archive (cached) ---------------------------
if [ ! -f "$work/ready" ]; then
    kpkg=$(apt-cache depends "linux-image-$arch:$arch" | sed -n 's/.*Depends: \(linux-image-[^:]*\).*/\1/p' | head -1)
    [ -n "$kpkg" ] || { echo "cannot resolve linux-image-$arch:$arch (dpkg --add-architecture $arch?)" >&2; exit 1; }
    rm -rf "$work/dl" "$work/root" && mkdir -p "$work/dl"
    (cd "$work/dl" && apt-get download "$kpkg:$arch" "busybox-static:$arch" >/dev/null 2>&1)
    for d in "$work"/dl/*.deb; do dpkg -x "$d" "$work/root"; done
    kver=${kpkg#linux-image-}
    /sbin/depmod -b "$work/root" "$kver"
    echo "$kver" > "$work/kver"
    touch "$work/ready"
fi
kver=$(cat "$work/kver")
mods=$work/root/lib/modules/$kver

# Modules in load order: modules.dep lists a module's dependencies with the deepest last.
load_order() {
    local m line
    for m in "$@"; do
        line=$(grep -E "^kernel/.*/$m\.ko:" "$mods/modules.dep") || continue
        # deps reversed, then the module itself
        echo "${line#*:}" | tr ' ' '\n' | sed '/^$/d' | tac
        echo "${line%%:*}"
    done | awk '!seen[$0]++'
}
order=$(load_order virtio_pci virtio_net vivid)

# --- initramfs ----------------------------------------------------------------------------
rd=$work/initramfs
rm -rf "$rd" && mkdir -p "$rd"/{bin,sbin,proc,sys,dev,tmp,lib,lib64,modules,etc}
cp "$work/root/bin/busybox" "$rd/bin/busybox"
for a in sh mount insmod ip ls cat echo sleep poweroff mkdir; do ln -sf busybox "$rd/bin/$a"; done
n=0
for m in $order; do
    n=$((n + 1))
    cp "$mods/$m" "$rd/modules/$(printf '%02d' $n)-$(basename "$m")"
done
cp "$bin" "$rd/bin/edgesight"
$strip "$rd/bin/edgesight" 2>/dev/null || true
# The binary's shared libraries, from the target's libc.
interp=$(readelf -l "$bin" | sed -n 's/.*interpreter: \(.*\)]/\1/p')
for lib in $(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p') "$(basename "$interp")"; do
    cp -L "$libdir/$lib" "$rd/lib/"
done
mkdir -p "$rd$(dirname "$interp")"
cp -L "$libdir/$(basename "$interp")" "$rd$interp"
cp tests/fixtures/models/shapes_int8_qlinear.onnx "$rd/model.onnx"
cp tests/fixtures/labels.txt "$rd/labels.txt"
cat > "$rd/config.toml" <<'EOF'
[device]
id = "qemu-pi"
[log]
level = "info"
[mqtt]
host = "0.0.0.0"
port = 1883
embedded_broker = true
[model]
path = "/model.onnx"
labels = "/labels.txt"
[[camera]]
name = "vivid"
source = "v4l2"
device = 0
width = 640
height = 480
fps = 5
EOF
cat > "$rd/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /modules/*.ko; do insmod "$m" || echo "edgesight-vm: insmod $m failed"; done
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
echo "edgesight-vm: video nodes: $(ls /dev/video*)"
/bin/edgesight cameras
echo "edgesight-vm: starting edgesight"
/bin/edgesight run --config /config.toml
echo "edgesight-vm: edgesight exited with $?"
poweroff -f
EOF
chmod +x "$rd/init"
(cd "$rd" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initramfs.cpio.gz"

# --- boot and observe ---------------------------------------------------------------------
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 18831)
log=$work/console.log
"${qemu[@]}" -m 1024 -nographic -no-reboot \
    -kernel "$work/root/boot/vmlinuz-$kver" -initrd "$work/initramfs.cpio.gz" \
    -append "console=$console panic=-1 quiet" \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:1883" -device virtio-net-pci,netdev=n0 \
    > "$log" 2>&1 &
vm=$!
trap 'kill $vm 2>/dev/null || true' EXIT
echo "booting $arch ($kver) with $(basename "$bin"); console: $log; MQTT on 127.0.0.1:$port"
t0=$(date +%s)
msgs=$work/messages.txt
: > "$msgs"
# Up to 10 minutes under TCG: boot, broker start, camera open, first inferences.
while [ $(( $(date +%s) - t0 )) -lt 600 ]; do
    if ! kill -0 $vm 2>/dev/null; then break; fi
    if grep -q "edgesight-vm: starting" "$log"; then
        timeout 120 mosquitto_sub -h 127.0.0.1 -p "$port" -t 'edgesight/#' -v -C $((want + 1)) \
            >> "$msgs" 2>/dev/null && break
    fi
    sleep 2
done
got=$(grep -c '/classification ' "$msgs" || true)
echo "--- console (tail) ---"; tr -d '\r' < "$log" | grep -v '^\s*$' | tail -25
echo "--- MQTT on the host ($got classification(s) in $(( $(date +%s) - t0 )) s) ---"; head -3 "$msgs" | cut -c1-220
[ "$got" -ge "$want" ] || { echo "FAIL: wanted $want classification messages, got $got" >&2; exit 1; }
grep -q '"camera":"vivid"' "$msgs"
echo "PASS: $arch VM captured from vivid through nokhwa and published $got classification(s)"
