#!/usr/bin/env bash
# Install missing Debian packages: `edgesight_deps PKG...`. Sourced by tools/demo.sh and
# tools/test.sh; .ci/run installs the full list up front.
EDGESIGHT_BUILD_DEBS=(libclang-dev nasm)         # nokhwa's V4L2 bindings (bindgen); libjpeg-turbo SIMD
EDGESIGHT_DEMO_DEBS=(mosquitto-clients)          # mosquitto_sub, to watch the demo
EDGESIGHT_TEST_DEBS=(mosquitto openssl           # the second broker the MQTT tests run against; test certificates
    ffmpeg                                       # stream cameras: MJPEG/YUV on stdout, HTTP MJPEG, RTSP client
    python3-gi gir1.2-gst-rtsp-server-1.0        # a real RTSP server (tests/tools/rtsp_server.py)
    gstreamer1.0-plugins-base gstreamer1.0-plugins-good)

edgesight_deps() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing: ${missing[*]}" >&2
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}
