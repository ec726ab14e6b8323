#!/usr/bin/env bash
# Install a built edgesight .deb on this machine and check it: every file in place, the
# service user in the video group, the conffile readable by the service only, and
# `edgesight check` passing against the installed config as the service user. Root only.
# Usage: tools/check-deb.sh path/to/edgesight_*.deb
set -euo pipefail
deb=${1:?path to the .deb}
dpkg -i "$deb"
trap 'dpkg --purge edgesight >/dev/null 2>&1 || true' EXIT
for f in /usr/bin/edgesight /etc/edgesight/config.toml /etc/edgesight/config.d \
         /usr/lib/systemd/system/edgesight.service /usr/lib/sysusers.d/edgesight.conf \
         /usr/share/edgesight/models/shapes_int8_qlinear.onnx \
         /usr/share/edgesight/models/shapes_labels.txt /usr/share/edgesight/imagenet_labels.txt \
         /usr/share/edgesight/samples/circle/00.png /usr/share/doc/edgesight/README.md; do
    [ -e "$f" ] || { echo "missing: $f" >&2; exit 1; }
done
dpkg-query -W -f='${Conffiles}\n' edgesight | grep -q /etc/edgesight/config.toml
id -nG edgesight | tr ' ' '\n' | grep -qx video || { echo "edgesight is not in group video" >&2; exit 1; }
[ "$(stat -c %a:%G /etc/edgesight/config.toml)" = "640:edgesight" ] || {
    echo "config.toml is $(stat -c %a:%G /etc/edgesight/config.toml), want 640:edgesight" >&2; exit 1; }
runuser -u edgesight -- /usr/bin/edgesight check --config /etc/edgesight/config.toml > /tmp/edgesight-check.txt
grep -q "is valid" /tmp/edgesight-check.txt
echo "package $(basename "$deb"): installed, files in place, check passes as user edgesight"
