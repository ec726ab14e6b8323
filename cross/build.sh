#!/usr/bin/env bash
# Cross-build edgesight for ARM boards with no rustup targets: Debian's rustc-web/cargo-web
# (bookworm-security) plus the libstd-rust-web-dev of the target architecture, unpacked
# into that compiler's rustlib, and the gcc cross toolchains. Root (or sudo) for apt.
#
#   cross/build.sh setup aarch64|armv7        install the toolchain for a target
#   cross/build.sh build aarch64|armv7        release binary + .deb (target/cross/...)
#   cross/build.sh test  aarch64|armv7 [CPU [all|kernels]]
#                                             lib, model-parity and end-to-end tests under
#                                             qemu-user (QEMU_CPU=CPU, e.g. cortex-a72); with
#                                             `all` also the daemon, outbox, CLI, config
#                                             and capture-supervisor tests; with `kernels`
#                                             only the lib and model tests (another core's
#                                             int8 kernels, the rest run on one core already)
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=${1:?setup|build|test}
arch=${2:?aarch64|armv7}
case "$arch" in
    aarch64) triple=aarch64-unknown-linux-gnu;   deb=arm64; gnu=aarch64-linux-gnu;   qemu=qemu-aarch64-static ;;
    armv7)   triple=armv7-unknown-linux-gnueabihf; deb=armhf; gnu=arm-linux-gnueabihf; qemu=qemu-arm-static ;;
    *) echo "unknown arch $arch (aarch64 or armv7)" >&2; exit 2 ;;
esac
sudo=(); [ "$(id -u)" -eq 0 ] || sudo=(sudo)
RUSTC=/usr/bin/rustc   # Debian's rustc-web, not a rustup proxy
CARGO=/usr/bin/cargo

setup() {
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" dpkg --add-architecture "$deb"
    # The security index of a foreign architecture may be mid-sync: retry.
    for i in 1 2 3 4 5; do "${sudo[@]}" apt-get update -q && break; sleep $((i * 5)); done
    "${sudo[@]}" apt-get install -y -q --no-install-recommends rustc-web cargo-web libclang-dev \
        rust-web-src "gcc-$gnu" "libc6-dev-$deb-cross" "linux-libc-dev-$deb-cross" qemu-user-static
    local ver tmp
    ver=$(dpkg-query -W -f='${Version}' rustc-web)
    tmp=$(mktemp -d)
    # The target's libstd must be the compiler's exact version. A foreign architecture's
    # security index can lag the amd64 one (armhf had only 1.85 for days): retry, and if
    # it is still missing, build std from source instead (rust-web-src, -Zbuild-std).
    local try
    for try in 1 2 3; do
        (cd "$tmp" && apt-get download "libstd-rust-web-dev:$deb=$ver" 2>/dev/null) && break
        if [ "$try" = 3 ]; then
            echo "libstd-rust-web-dev:$deb $ver is not in the archive (have:" \
                "$(apt-cache policy "libstd-rust-web-dev:$deb" | sed -n 's/ *Candidate: //p'));" \
                "builds will compile std from rust-web-src (-Zbuild-std)" >&2
            rm -rf "$tmp"
            return 0
        fi
        sleep $((try * 10))
        "${sudo[@]}" apt-get update -q >/dev/null || true
    done
    dpkg -x "$tmp"/libstd-rust-web-dev_*.deb "$tmp/x"
    local sysroot; sysroot=$($RUSTC --print sysroot)
    "${sudo[@]}" cp -a "$tmp/x/usr/lib/rustlib/$triple" "$sysroot/lib/rustlib/"
    rm -rf "$tmp"
    echo "$($RUSTC --version) can now build $triple"
}

cross_env() {
    local up lo
    up=$(echo "$triple" | tr 'a-z-' 'A-Z_')
    lo=$(echo "$triple" | tr '-' '_')
    export PATH="/usr/bin:$PATH" RUSTC CARGO_TARGET_DIR=target/cross
    export "CARGO_TARGET_${up}_LINKER=$gnu-gcc"
    export "CC_${lo}=$gnu-gcc" "CXX_${lo}=$gnu-g++" "AR_${lo}=$gnu-ar"
    # nokhwa's V4L2 bindings: bindgen must read the target's kernel headers.
    export "BINDGEN_EXTRA_CLANG_ARGS_${lo}=--target=$gnu --sysroot=/usr/$gnu"
    export "CARGO_TARGET_${up}_RUNNER=$qemu -L /usr/$gnu"
    export QEMU_LD_PREFIX="/usr/$gnu"
    # No prebuilt std for this target (see setup): compile it with the crate graph.
    # RUSTC_BOOTSTRAP unlocks -Z flags on a stable compiler; std's sources are the
    # compiler's own (rust-web-src), so the result is the same std, built here.
    build_std=()
    if [ ! -d "$($RUSTC --print sysroot)/lib/rustlib/$triple/lib" ]; then
        export RUSTC_BOOTSTRAP=1
        build_std=(-Zbuild-std=std,panic_unwind)
        echo "(building std for $triple from source)"
    fi
}

# Tests run the edgesight binary they built (a foreign one): the kernel hands it to qemu
# through binfmt_misc, registered here from qemu-user-static's own entry if it is not.
binfmt() {
    local reg=/proc/sys/fs/binfmt_misc name=${qemu%-static}
    [ -e "$reg/register" ] || "${sudo[@]}" mount -t binfmt_misc binfmt_misc "$reg"
    [ -e "$reg/$name" ] || "${sudo[@]}" sh -c "cat /usr/lib/binfmt.d/$name.conf > $reg/register"
}

case "$cmd" in
    setup) setup ;;
    build)
        cross_env
        $CARGO build --release --locked --target "$triple" "${build_std[@]}"
        ls -l "target/cross/$triple/release/edgesight"
        tools/package.sh --target "$triple" --no-build
        ;;
    test)
        cross_env
        if [ -n "${3:-}" ]; then export QEMU_CPU="$3"; fi
        binfmt
        echo "== tests for $triple under $qemu${QEMU_CPU:+ (QEMU_CPU=$QEMU_CPU)}"
        # Without debuginfo (dependencies are at opt-level 1 in every dev build: Cargo.toml).
        # `all` adds the tests that run the daemon's binary and its outbox, supervisor and
        # CLI (one core is enough for them: they do not depend on the int8 kernels). The
        # wedge tests hold a thread with ptrace, which qemu-user does not emulate.
        tests=(--lib --test model --test hostile_models --test e2e --test prepare)
        # prepare.rs's two closeness tests compare two portable Rust paths over big frames:
        # they run natively on x86. Under qemu they held prepare.rs at 113 s on armv7
        # (~40 s without them); the frames of every format, MJPEG's decode included, are
        # still classified here.
        skip=(--skip stays_close_to_the_reference_path --skip prepared_like_the_cropped_frame)
        case "${4:-}" in
            all)
                tests+=(--test outbox --test daemon --test cli --test config_errors --test capture)
                skip+=(--skip wedged --skip stale) ;;
            kernels) tests=(--lib --test model --test hostile_models) ;;
            '') ;;
            *) echo "unknown test set $4 (all or kernels)" >&2; exit 2 ;;
        esac
        $CARGO test --locked --target "$triple" "${build_std[@]}" \
            --config 'profile.dev.debug=0' \
            "${tests[@]}" -- --nocapture "${skip[@]}"
        ;;
    *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
