#!/usr/bin/env bash
# Check systemd/edgesight.service: `systemd-analyze verify` clean and
# `systemd-analyze security --offline=true` exposure <= 2.0. Needs the systemd package.
# Usage: tools/check-unit.sh [path/to/edgesight binary]   (default target/debug/edgesight)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/debug/edgesight}")
max=2.0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# verify wants ExecStart's binary to exist; point it at the one we built.
sed "s|/usr/bin/edgesight|$bin|" systemd/edgesight.service > "$tmp/edgesight.service"
out=$(systemd-analyze verify "$tmp/edgesight.service" 2>&1 || true)
# Complaints about the host's own units (containers lack some) are not ours.
ours=$(printf '%s\n' "$out" | grep -F "edgesight.service" || true)
if [ -n "$ours" ]; then
    printf 'systemd-analyze verify:\n%s\n' "$ours" >&2
    exit 1
fi
# A wedged camera driver must not be able to take the board's threads or memory.
for key in TasksMax MemoryMax; do
    grep -q "^$key=" systemd/edgesight.service || { echo "edgesight.service: no $key=" >&2; exit 1; }
done
# A crash (a panic aborts) is restarted; a configuration error (exit 78) is not: the
# same configuration would fail again, every RestartSec, forever.
for line in "Restart=on-failure" "RestartPreventExitStatus=78" "Type=notify"; do
    grep -qx "$line" systemd/edgesight.service || { echo "edgesight.service: no $line" >&2; exit 1; }
done
score=$(systemd-analyze security --offline=true systemd/edgesight.service 2>/dev/null \
    | sed -n 's/.*Overall exposure level for edgesight.service: \([0-9.]*\).*/\1/p')
[ -n "$score" ] || { echo "no exposure score from systemd-analyze security" >&2; exit 1; }
echo "edgesight.service: verify clean, exposure $score (limit $max)"
awk -v s="$score" -v m="$max" 'BEGIN { exit !(s <= m) }'
