#!/usr/bin/env bash
# The README demo: the daemon on the bundled samples and int8 model, with its in-process
# MQTT broker on 127.0.0.1:1883, and a real MQTT subscriber (mosquitto_sub) printing what
# it publishes. Ctrl-C stops both (the daemon publishes `offline` on the way out).
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/deps.sh
edgesight_deps "${EDGESIGHT_BUILD_DEBS[@]}" "${EDGESIGHT_DEMO_DEBS[@]}"
cargo build --release --locked
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port=1883
if ! port_free $port; then
    # A broker (e.g. a system Mosquitto) already has 1883: run the demo's own beside it.
    port=18883
    echo "demo: 127.0.0.1:1883 is taken; the demo broker uses 127.0.0.1:$port" >&2
fi
EDGESIGHT__MQTT__PORT=$port target/release/edgesight run --config config/demo.toml &
daemon=$!
sub=
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon; sleep 0.5; [ -n "$sub" ] && kill $sub 2>/dev/null; exit 0' INT TERM
for _ in $(seq 300); do port_free $port || break; sleep 0.1; done
# Its own session, so Ctrl-C reaches only the daemon and the subscriber still prints the
# daemon's last messages and its `offline`.
setsid mosquitto_sub -h 127.0.0.1 -p $port -t 'edgesight/#' -v &
sub=$!
wait $daemon
