#!/usr/bin/env bash
# Boot Debian's kernel under qemu-system with a busybox initramfs, load the `vivid` V4L2
# driver (a real camera driver, no camera needed) as seven cameras, run edgesight on all of
# them with its embedded broker, unplug and replug them mid-stream (unbinding the `vivid`
# platform device removes every instance, like pulling a USB hub), and check from the
# host, through a qemu hostfwd port bound to 127.0.0.1, what arrived over MQTT:
#   - every pixel format vivid offers through nokhwa (YUYV, NV12, RGB3, BGR3) is captured
#     and classified, each camera in the mode it asked for, and its snapshot (the
#     `snapshot` command) shows vivid's colour bars in their colours;
#   - mode negotiation: a camera asking for 1000x600 gets vivid's closest, 1280x720 YUYV;
#   - GREY, which nokhwa 0.10 itself could not open (it asked drivers for "GRAY"; fixed in
#     vendor/nokhwa-bindings-linux);
#   - a camera asking for MJPEG, which vivid does not offer, is offline with a reason
#     naming what the device offers, and stops nothing else;
#   - a driver that stops delivering (vivid's dropped-buffers control at 100 %) stalls the
#     camera without piling up reader threads (the thread count is sampled twice), and it
#     streams again at 0 %; buffers the driver flags as corrupt (vivid's error injection)
#     are dropped and counted without taking the camera offline;
#   - unplugged cameras go offline (retained availability + status with the reason) and
#     come back online and classifying after the replug, found again through their by-id
#     links, one of them (held open meanwhile) under a new /dev/videoN;
#   - the device's own availability is online, then offline after SIGTERM, exit code 0.
#
#   tests/vm/run.sh ARCH BINARY
#     ARCH     arm64 (an emulated Raspberry Pi: -M virt -cpu cortex-a72) or amd64
#     BINARY   edgesight built for ARCH
#   EDGESIGHT_VM_SETTLE  seconds to stream before the unplug and after the replug (25)
#
# Everything comes from Debian's archive (kernel, busybox-static, qemu-system). Work files
# are kept in target/vm/ARCH so a second run starts at once. Needs: qemu-system-arm or
# qemu-system-x86, kmod (depmod), cpio, mosquitto-clients, python3; for arm64 also the
# arm64 cross libc (libc6-dev-arm64-cross) and `dpkg --add-architecture arm64`.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/vm/lib.sh
arch=${1:?arm64|amd64}
bin=$(realpath "${2:?edgesight binary}")
settle=${EDGESIGHT_VM_SETTLE:-25}
work=target/vm/$arch
mkdir -p "$work"

case "$arch" in
    arm64)
        qemu=(qemu-system-aarch64 -M virt -cpu cortex-a72 -smp 2)
        console=ttyAMA0
        libdir=/usr/aarch64-linux-gnu/lib
        strip=aarch64-linux-gnu-strip
        cc=aarch64-linux-gnu-gcc
        ;;
    amd64)
        qemu=(qemu-system-x86_64 -cpu max -smp 2)
        console=ttyS0
        libdir=/lib/x86_64-linux-gnu
        strip=strip
        cc=gcc
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
for a in sh mount insmod ip ls cat echo sleep poweroff mkdir ln basename kill wc readlink; do ln -sf busybox "$rd/bin/$a"; done
# Sets vivid's controls (busybox has no v4l2-ctl): static, from the target's gcc.
$cc -static -O2 -o "$rd/bin/v4l2-ctl" tests/vm/v4l2-ctl.c
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
{
    cat <<'EOF'
[device]
id = "qemu-pi"
[log]
level = "info"
[mqtt]
host = "0.0.0.0"
port = 1883
embedded_broker = true
stats_interval_secs = 5
[model]
path = "/model.onnx"
labels = "/labels.txt"
[commands]
enabled = true
EOF
    # name, vivid instance, format, width, height, fps
    while read -r name k format w h fps; do
        printf '[[camera]]\nname = "%s"\nsource = "v4l2"\ndevice = "/dev/v4l/by-id/vivid-%s"\n' "$name" "$k"
        printf 'format = "%s"\nwidth = %s\nheight = %s\nfps = %s\n' "$format" "$w" "$h" "$fps"
        printf 'reopen_min_ms = 500\nreopen_max_ms = 4000\n'
    done <<'EOF'
yuyv 0 yuyv 320 180 5
nv12 1 nv12 320 180 5
gray 2 gray 320 180 5
rgb 3 rgb 320 180 5
bgr 4 bgr 320 180 5
auto 5 auto 1000 600 1
mjpeg 6 mjpeg 320 180 5
EOF
    # vivid-000's video output node: a V4L2 node that cannot capture.
    printf '[[camera]]\nname = "output"\nsource = "v4l2"\ndevice = "/dev/video1"\n'
} > "$rd/config.toml"
echo "settle=$settle" > "$rd/settle"
cat > "$rd/init" <<'EOF'
#!/bin/sh
. /settle
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /modules/*.ko; do
    case "$m" in
        # Seven instances: the first with vivid's default nodes (so there are metadata and
        # output nodes to skip), the others video capture only.
        *vivid.ko) insmod "$m" n_devs=7 node_types=0xe1d3d,0x1,0x1,0x1,0x1,0x1,0x1 ;;
        *) insmod "$m" ;;
    esac || echo "edgesight-vm: insmod $m failed"
done
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
# What udev would do: a stable by-id link per camera, whatever its /dev/videoN.
mkdir -p /dev/v4l/by-id
link() {
    for d in /sys/class/video4linux/video*; do
        if [ "$(cat "$d/name")" = "vivid-00$1-vid-cap" ]; then
            ln -sfn "/dev/$(basename "$d")" "/dev/v4l/by-id/vivid-$1"
        fi
    done
}
for k in 0 1 2 3 4 5 6; do link $k; done
echo "edgesight-vm: video nodes: $(ls /dev/video*)"
/bin/edgesight cameras
echo "edgesight-vm: starting edgesight"
/bin/edgesight run --config /config.toml &
pid=$!
sleep "$settle"
# vivid-5's capture node is held open across the unplug: its number stays taken until the
# last close, so that camera comes back under a new /dev/videoN (as a USB camera does in
# another port) and only its by-id link leads to it.
was=$(readlink /dev/v4l/by-id/vivid-5)
exec 9<"$was"
echo "edgesight-vm: unplug vivid.0"
echo vivid.0 > /sys/bus/platform/drivers/vivid/unbind
sleep 10
echo vivid.0 > /sys/bus/platform/drivers/vivid/bind
for k in 0 1 2 3 4 5 6; do link $k; done
exec 9<&-
echo "edgesight-vm: replug vivid.0: vivid-5 was $was, now $(readlink /dev/v4l/by-id/vivid-5)"
sleep "$settle"
# A driver that stops delivering: nv12's reader blocks in the driver, the camera stalls
# and is retried; its threads must not pile up. Then it delivers again.
threads() { ls /proc/$pid/task | wc -l; }
# vivid's controls (drivers/media/test-drivers/vivid/vivid-ctrls.h): VIVID_CID_VIVID_BASE
# 0x00f0f000 + 64 = percentage of dropped buffers, + 66 = the next buffer flagged ERROR.
dropped=0x00f0f040
flag_error=0x00f0f042
echo "edgesight-vm: threads before the drops: $(threads)"
/bin/v4l2-ctl /dev/v4l/by-id/vivid-1 $dropped 100
sleep 20
echo "edgesight-vm: threads while nv12 drops everything: $(threads)"
sleep 20
echo "edgesight-vm: threads while nv12 drops everything: $(threads)"
/bin/v4l2-ctl /dev/v4l/by-id/vivid-1 $dropped 0
echo "edgesight-vm: nv12 delivers again"
# Buffers flagged V4L2_BUF_FLAG_ERROR on rgb: dropped, counted, the camera stays online.
for i in 1 2 3 4 5 6 7 8; do
    /bin/v4l2-ctl /dev/v4l/by-id/vivid-3 $flag_error 1 || break
    sleep 1
done
echo "edgesight-vm: flagged 8 rgb buffers"
sleep "$settle"
echo "edgesight-vm: stopping edgesight"
kill -TERM $pid
wait $pid
echo "edgesight-vm: edgesight exited with $?"
poweroff -f
EOF
chmod +x "$rd/init"
(cd "$rd" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initramfs.cpio.gz"

# --- boot and observe ---------------------------------------------------------------------
port=$(free_port)
log=$work/console.log
msgs=$work/messages.txt
: > "$msgs"
"${qemu[@]}" -m 1024 -nographic -no-reboot \
    -kernel "$work/root/boot/vmlinuz-$kver" -initrd "$work/initramfs.cpio.gz" \
    -append "console=$console panic=-1 quiet" \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:1883" -device virtio-net-pci,netdev=n0 \
    > "$log" 2>&1 &
vm=$!
trap 'kill $vm 2>/dev/null || true' EXIT
echo "booting $arch ($kver) with $(basename "$bin"); console: $log; MQTT on 127.0.0.1:$port"
t0=$(date +%s)
until grep -q "edgesight-vm: starting" "$log"; do
    kill -0 $vm 2>/dev/null || break
    [ $(( $(date +%s) - t0 )) -lt 300 ] || break
    sleep 1
done
# vivid's test pattern (75% colour bars) as each camera's snapshot shows it: a frame the
# driver made in each pixel format, converted by edgesight, JPEG-encoded; taken halfway
# into the first settle, before the unplug.
snapshot() {
    local cam=$1 out=$work/snap-$1.jpg try sub
    for try in 1 2 3 4 5; do
        timeout 30 mosquitto_sub -h 127.0.0.1 -p "$port" -t "edgesight/qemu-pi/$cam/snapshot" \
            -C 1 -N > "$out" 2>/dev/null &
        sub=$!
        sleep 2
        mosquitto_pub -h 127.0.0.1 -p "$port" -t edgesight/qemu-pi/cmd/snapshot \
            -m "{\"camera\":\"$cam\",\"id\":$try}" 2>/dev/null || true
        if wait $sub && [ -s "$out" ]; then return 0; fi
        sleep 2
    done
    echo "no snapshot of $cam" >&2
}
rm -f "$work"/snap-*.jpg
( sleep $(( settle / 2 )); for cam in yuyv nv12 gray rgb bgr auto; do snapshot $cam; done ) &
snaps=$!
subscribe_while_running $vm "$port" "$msgs" 900
kill $vm 2>/dev/null || true
wait $snaps || true
# Each bar's mean colour: the bottom eighth of the frame (vivid's text covers the rest at
# 320x180), averaged over eight columns.
bars=$work/bars.txt
: > "$bars"
for f in "$work"/snap-*.jpg; do
    [ -s "$f" ] || continue
    cam=$(basename "$f" .jpg); cam=${cam#snap-}
    echo "$cam $(ffmpeg -loglevel error -i "$f" -vf 'crop=iw:ih/8:0:ih*7/8,scale=8:1:flags=area' \
        -f rawvideo -pix_fmt rgb24 - | od -An -v -tu1 | tr -s ' \n' ' ')" >> "$bars"
done
echo "--- console (edgesight cameras, then the run) ---"
tr -d '\r' < "$log" | sed -n '/edgesight-vm: video nodes/,$p' | grep -v '^\s*$' | cut -c1-200 | tail -70
echo "--- MQTT on the host ($(wc -l < "$msgs") messages in $(( $(date +%s) - t0 )) s) ---"
python3 tests/vm/check.py "$msgs" "$log" "$bars"
echo "PASS: $arch VM: vivid cameras captured through nokhwa in every format, unplug/replug recovered"
