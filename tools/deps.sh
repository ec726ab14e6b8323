#!/usr/bin/env bash
# Install the Debian packages edgesight needs to build and test, if any is missing.
# Sourced by tools/demo.sh and tools/test.sh; .ci/run installs the same list.
EDGESIGHT_DEBS=(libclang-dev mosquitto mosquitto-clients)

edgesight_deps() {
    local missing=()
    for p in "${EDGESIGHT_DEBS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing: ${missing[*]}" >&2
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}
