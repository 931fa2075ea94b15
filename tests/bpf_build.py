"""Building eBPF test programs with clang, as tenants do (`-O2 -g -target bpf`, libbpf headers)."""

import shutil
import subprocess
from pathlib import Path

import pytest

HEADER = """
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
char LICENSE[] SEC("license") = "GPL";
"""

# A packet counter: an array map in `.maps`, a lookup and an atomic add; returns XDP_PASS.
COUNTER = """
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 4);
    __type(key, __u32);
    __type(value, __u64);
} counters SEC(".maps");

SEC("xdp")
int count_packets(struct xdp_md *ctx)
{
    __u32 key = 0;
    __u64 *value = bpf_map_lookup_elem(&counters, &key);
    if (value)
        __sync_fetch_and_add(value, 1);
    return XDP_PASS;
}
"""


def bpf_builder(directory: Path):
    """A function compiling (name, C source) to object bytes; skips the test without clang."""
    clang = shutil.which("clang")
    if clang is None or not Path("/usr/include/bpf/bpf_helpers.h").exists():
        pytest.skip("clang and libbpf-dev are not installed (deploy/setup.sh installs them)")

    def build(name: str, source: str, extra: tuple[str, ...] = ()) -> bytes:
        (directory / f"{name}.c").write_text(HEADER + source)
        flags = ["-O2", "-g", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu", *extra]
        subprocess.run([clang, *flags, "-c", f"{name}.c", "-o", f"{name}.o"], cwd=directory, check=True)
        return (directory / f"{name}.o").read_bytes()

    return build
