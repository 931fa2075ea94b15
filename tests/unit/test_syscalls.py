"""System call tables per architecture, checked against each one's own <asm/unistd.h>, and
hetfaas-waiter built for a DPU's aarch64 and run under qemu-user (deploy/setup.sh installs the
cross compiler and qemu as root)."""

import platform
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from fabric import syscalls
from host_node.sandbox import waiter

NAMES = sorted(set(syscalls.X86_64.numbers) | set(syscalls.AARCH64.numbers))


def listing_program() -> str:
    """C that prints `name number` for each name its architecture's headers define."""
    lines = ["#include <stdio.h>", "#include <asm/unistd.h>", "int main(void) {"]
    for name in NAMES:
        lines += [f"#ifdef __NR_{name}", f'printf("{name} %d\\n", __NR_{name});', "#endif"]
    return "\n".join([*lines, "return 0; }", ""])


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (deploy/setup.sh installs it as root)")
    return found


def aarch64_tools() -> tuple[str, str]:
    if platform.machine() != "x86_64":
        pytest.skip("cross-building for aarch64 is tested from x86_64 hosts")
    return tool("aarch64-linux-gnu-gcc"), tool("qemu-aarch64")


def numbers_from(output: str) -> dict[str, int]:
    return {name: int(number) for name, number in (line.split() for line in output.splitlines())}


def test_the_x86_64_table_is_the_kernel_headers(tmp_path: Path) -> None:
    if platform.machine() != "x86_64":
        pytest.skip("this machine is not x86_64")
    (tmp_path / "nr.c").write_text(listing_program())
    subprocess.run([tool("cc"), "-o", "nr", "nr.c"], cwd=tmp_path, check=True)
    listed = subprocess.run(["./nr"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert numbers_from(listed) == syscalls.X86_64.numbers


def test_the_aarch64_table_is_the_kernel_headers(tmp_path: Path) -> None:
    cross, qemu = aarch64_tools()
    (tmp_path / "nr.c").write_text(listing_program())
    subprocess.run([cross, "-static", "-o", "nr", "nr.c"], cwd=tmp_path, check=True)
    listed = subprocess.run([qemu, "./nr"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert numbers_from(listed.stdout) == syscalls.AARCH64.numbers


def test_this_machine_has_a_table_and_others_are_refused_clearly() -> None:
    assert syscalls.here().name == platform.machine()
    assert syscalls.arch_named("arm64") is syscalls.AARCH64
    with pytest.raises(syscalls.UnsupportedArch, match=r"riscv64.*x86_64, aarch64"):
        syscalls.arch_named("riscv64")


def run_waiter_under_qemu(binary: Path, qemu: str, activation: bytes) -> bytes:
    """Start the aarch64 waiter with one end of a seqpacket pair, send `activation`, read its answer."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        process = subprocess.Popen([qemu, str(binary), str(theirs.fileno())], pass_fds=[theirs.fileno()])
        theirs.close()
        ours.sendmsg([activation])
        ours.settimeout(30)
        answer = ours.recv(1024)
        assert process.wait(timeout=30) == 127
    return answer


def test_the_waiter_builds_for_aarch64_and_parses_activations_under_qemu(tmp_path: Path) -> None:
    cross, qemu = aarch64_tools()
    binary = waiter.build(cross, tmp_path / "bin" / "hetfaas-waiter", "-static")
    assert binary.read_bytes()[18:20] == struct.pack("<H", 183), "e_machine is EM_AARCH64"

    too_short = run_waiter_under_qemu(binary, qemu, b"\0" * 8)
    # CODE_MOUNTED (1), uid, gid, nofile, no seccomp bytes; argv ["true"], no env: parsed whole,
    # it goes on to chdir /code, which this machine lacks (a sandbox has it).
    command = struct.pack("=5I", 1, 65534, 65534, 64, 0) + b"true\0\0\0"
    parsed = run_waiter_under_qemu(binary, qemu, command)
    empty = run_waiter_under_qemu(binary, qemu, struct.pack("=5I", 1, 0, 0, 0, 0) + b"\0\0")

    assert too_short.startswith(b"Eactivation message")
    assert parsed.startswith(b"Echdir /code" if not Path("/code").exists() else b"E")
    assert empty.startswith(b"Eempty command")
