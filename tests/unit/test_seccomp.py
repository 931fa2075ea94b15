"""The seccomp deny-list, run through a classic-BPF interpreter for the opcodes it uses."""

import errno
import struct

import pytest

from host_node.sandbox import seccomp as sc

EPERM = sc.RET_ERRNO | errno.EPERM


def run_filter(program: bytes, nr: int, args=(0,) * 6, arch=sc.AUDIT_ARCH_X86_64) -> int:
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


PROGRAM = sc.encode(sc.deny_list_program())
SOCKET, CLONE = sc.SOCKET_X86_64, sc.CLONE_X86_64
AF_INET, AF_UNIX, SOCK_STREAM, SOCK_DGRAM = 2, 1, 1, 2
SIGCHLD = 17
CLONE_NEWNET, CLONE_NEWUSER, CLONE_THREAD = 0x40000000, 0x10000000, 0x10000


@pytest.mark.parametrize("name", sorted(sc.DENIED_X86_64))
def test_every_denied_call_gets_eperm(name):
    assert run_filter(PROGRAM, sc.DENIED_X86_64[name]) == EPERM


@pytest.mark.parametrize(
    ("nr", "args", "expected"),
    [
        (0, (), sc.RET_ALLOW),  # read
        (59, (), sc.RET_ALLOW),  # execve
        (CLONE, (SIGCHLD,), sc.RET_ALLOW),  # fork
        (CLONE, (CLONE_THREAD | 0x3D0F00,), sc.RET_ALLOW),  # pthread_create
        (CLONE, (SIGCHLD | CLONE_NEWNET,), EPERM),
        (CLONE, (SIGCHLD | CLONE_NEWUSER,), EPERM),
        (sc.CLONE3_X86_64, (), sc.RET_ERRNO | errno.ENOSYS),
        (SOCKET, (AF_INET, SOCK_STREAM), sc.RET_ALLOW),
        (SOCKET, (AF_UNIX, SOCK_DGRAM), sc.RET_ALLOW),
        (SOCKET, (16, sc.SOCK_RAW, 0), sc.RET_ALLOW),  # netlink routing, which getaddrinfo needs
        (SOCKET, (16, SOCK_DGRAM, 15), EPERM),  # netlink's kernel uevents
        (SOCKET, (16, sc.SOCK_RAW, 9), EPERM),  # netlink audit
        (SOCKET, (40, SOCK_STREAM), EPERM),  # vsock: the hypervisor's side of the machine
        (SOCKET, (38, 5), EPERM),  # AF_ALG: the kernel's crypto API
        (SOCKET, (44, SOCK_DGRAM), EPERM),  # AF_XDP
        (SOCKET, (sc.AF_INET6, sc.SOCK_RAW), EPERM),
        (SOCKET, (AF_INET, sc.SOCK_RAW), EPERM),
        (SOCKET, (AF_INET, sc.SOCK_RAW | 0x80000), EPERM),  # SOCK_CLOEXEC does not hide it
        (SOCKET, (sc.AF_PACKET, SOCK_DGRAM), EPERM),
        (sc.X32_SYSCALL_BIT + 39, (), sc.RET_KILL_PROCESS),  # x32's getpid
    ],
)
def test_decisions(nr, args, expected):
    assert run_filter(PROGRAM, nr, tuple(args) + (0,) * (6 - len(args))) == expected


def test_a_foreign_architecture_is_killed():
    assert run_filter(PROGRAM, 0, arch=0x40000003) == sc.RET_KILL_PROCESS  # i386
