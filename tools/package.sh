#!/usr/bin/env bash
# Build the Debian package with cargo-deb: binary, hardened unit, sysusers file, default
# config (a conffile, with installed paths), the demo model, samples and labels.
# Usage: tools/package.sh [--target TRIPLE] [--no-build] [--profile dev]
# (--profile dev packages the test build's binary: CI checks the package's layout without a
# second, release, build of every dependency.) Prints the .deb's path.
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --target) args+=(--target "$2"); shift 2 ;;
        --no-build) args+=(--no-build); shift ;;
        --profile) args+=(--profile "$2"); shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --version '^3'
# One source of truth for the config: the repo's, with paths moved to where the package
# puts things, and the device id left to default to the host name.
rm -rf target/deb && mkdir -p target/deb/samples
sed -e 's|"tests/fixtures/models/|"/usr/share/edgesight/models/|' \
    -e 's|"tests/fixtures/labels.txt"|"/usr/share/edgesight/models/shapes_labels.txt"|' \
    -e 's|"tests/fixtures/samples"|"/usr/share/edgesight/samples"|' \
    -e 's|^id = "pi-kitchen"|# id = "pi-kitchen"|' \
    config/edgesight.toml > target/deb/config.toml
if grep -n 'tests/fixtures' target/deb/config.toml; then
    echo "package config still points into the source tree" >&2; exit 1
fi
cp -r tests/fixtures/samples/. target/deb/samples/
cargo deb --locked "${args[@]}" 2>&1 | tail -1
