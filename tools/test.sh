#!/usr/bin/env bash
# The README test command: every test, with the MQTT tests against the in-process broker,
# then the end-to-end MQTT tests again against a real Mosquitto on a loopback port.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/deps.sh
edgesight_deps "${EDGESIGHT_BUILD_DEBS[@]}" "${EDGESIGHT_TEST_DEBS[@]}"
cargo test --locked
port=18830
conf=$(mktemp)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" > "$conf"
/usr/sbin/mosquitto -c "$conf" &
mosq=$!
trap 'kill $mosq 2>/dev/null; rm -f "$conf"' EXIT
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
echo "== end-to-end, outbox and stream-camera MQTT tests against Mosquitto on 127.0.0.1:$port"
EDGESIGHT_TEST_BROKER=127.0.0.1:$port cargo test --locked --test e2e --test outbox --test sources
