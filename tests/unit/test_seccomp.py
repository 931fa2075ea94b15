"""The seccomp deny-list, run through a classic-BPF interpreter for the opcodes it uses."""

import errno
import struct

import pytest

from fabric import syscalls
from host_node.sandbox import seccomp as sc

EPERM = sc.RET_ERRNO | errno.EPERM


def run_filter(program: bytes, nr: int, args=(0,) * 6, arch=syscalls.X86_64.audit_arch) -> int:
    data = struct.pack("=IIQ6Q", nr, arch, 0, *args)
    insns = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == sc.LD_W_ABS:
            acc = struct.unpack_from("=I", data, k)[0]
        elif code == sc.ALU_AND_K:
            acc &= k
        elif code in (sc.JEQ_K, sc.JGE_K, sc.JSET_K):
            taken = {sc.JEQ_K: acc == k, sc.JGE_K: acc >= k, sc.JSET_K: bool(acc & k)}[code]
            pc += jt if taken else jf
        elif code == sc.RET_K:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


ARCHES = [syscalls.X86_64, syscalls.AARCH64]
AF_INET, AF_UNIX, SOCK_STREAM, SOCK_DGRAM = 2, 1, 1, 2
SIGCHLD = 17
CLONE_NEWNET, CLONE_NEWUSER, CLONE_THREAD = 0x40000000, 0x10000000, 0x10000


def program_for(arch: syscalls.Arch) -> bytes:
    return sc.encode(sc.deny_list_program(arch))


@pytest.mark.parametrize(
    ("arch", "name"), [(a, n) for a in ARCHES for n in sorted(sc.denied_numbers(a))], ids=str
)
def test_every_denied_call_gets_eperm(arch: syscalls.Arch, name: str):
    assert run_filter(program_for(arch), arch.numbers[name], arch=arch.audit_arch) == EPERM


def test_aarch64_lacks_the_old_x86_calls_and_denies_the_rest():
    denied = sc.denied_numbers(syscalls.AARCH64)
    assert {"iopl", "uselib", "ustat", "_sysctl"}.isdisjoint(denied)
    assert denied["bpf"] == 280 and denied["mount"] == 40 and len(denied) == len(sc.DENIED) - 9


DECISIONS = [
    ("read", (), sc.RET_ALLOW),
    ("execve", (), sc.RET_ALLOW),
    ("clone", (SIGCHLD,), sc.RET_ALLOW),  # fork
    ("clone", (CLONE_THREAD | 0x3D0F00,), sc.RET_ALLOW),  # pthread_create
    ("clone", (SIGCHLD | CLONE_NEWNET,), EPERM),
    ("clone", (SIGCHLD | CLONE_NEWUSER,), EPERM),
    ("clone3", (), sc.RET_ERRNO | errno.ENOSYS),
    ("socket", (AF_INET, SOCK_STREAM), sc.RET_ALLOW),
    ("socket", (AF_UNIX, SOCK_DGRAM), sc.RET_ALLOW),
    ("socket", (16, sc.SOCK_RAW, 0), sc.RET_ALLOW),  # netlink routing, which getaddrinfo needs
    ("socket", (16, SOCK_DGRAM, 15), EPERM),  # netlink's kernel uevents
    ("socket", (16, sc.SOCK_RAW, 9), EPERM),  # netlink audit
    ("socket", (40, SOCK_STREAM), EPERM),  # vsock: the hypervisor's side of the machine
    ("socket", (38, 5), EPERM),  # AF_ALG: the kernel's crypto API
    ("socket", (44, SOCK_DGRAM), EPERM),  # AF_XDP
    ("socket", (sc.AF_INET6, sc.SOCK_RAW), EPERM),
    ("socket", (AF_INET, sc.SOCK_RAW), EPERM),
    ("socket", (AF_INET, sc.SOCK_RAW | 0x80000), EPERM),  # SOCK_CLOEXEC does not hide it
    ("socket", (sc.AF_PACKET, SOCK_DGRAM), EPERM),
]


@pytest.mark.parametrize(
    ("arch", "call", "args", "expected"), [(a, *d) for a in ARCHES for d in DECISIONS], ids=str
)
def test_decisions(arch: syscalls.Arch, call: str, args: tuple, expected: int):
    padded = tuple(args) + (0,) * (6 - len(args))
    assert run_filter(program_for(arch), arch.numbers[call], padded, arch.audit_arch) == expected


def test_x32_is_killed_on_x86_64():
    program = program_for(syscalls.X86_64)
    assert run_filter(program, sc.X32_SYSCALL_BIT + 39) == sc.RET_KILL_PROCESS  # x32's getpid


@pytest.mark.parametrize("arch", ARCHES, ids=str)
def test_a_foreign_architecture_is_killed(arch: syscalls.Arch):
    other = syscalls.AARCH64 if arch is syscalls.X86_64 else syscalls.X86_64
    program = program_for(arch)
    assert run_filter(program, 0, arch=0x40000003) == sc.RET_KILL_PROCESS  # i386
    assert run_filter(program, 0, arch=other.audit_arch) == sc.RET_KILL_PROCESS
