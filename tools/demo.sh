#!/usr/bin/env bash
# The README demo: the daemon on the bundled samples and int8 model, with its in-process
# MQTT broker on 127.0.0.1:1883, and a real MQTT subscriber (mosquitto_sub) printing what
# it publishes. Ctrl-C stops both (the daemon publishes `offline` on the way out).
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/deps.sh
edgesight_deps
cargo build --release --locked
target/release/edgesight run --config config/demo.toml &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon; kill $sub 2>/dev/null; exit 0' INT TERM
# Wait for the embedded broker, then watch every topic of the demo device.
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null && break; sleep 0.1; done
mosquitto_sub -h 127.0.0.1 -p 1883 -t 'edgesight/#' -v &
sub=$!
wait $daemon
