"""The sandbox's seccomp deny-list as a classic BPF program. Pure: builds bytes, loads nothing.

In the spirit of Docker's default profile: everything is allowed except calls that reach kernel-
wide state (mounts, modules, kexec, clocks, keys, bpf, perf, ptrace, namespaces, io_uring) and
sockets of any family but unix, IPv4/IPv6 (not raw) and netlink's routing protocol (which
glibc's getaddrinfo and if_nameindex use): no vsock, packet, uevent netlink, AF_ALG and the rest
of the kernel's rarely used, often buggy families. clone3 answers ENOSYS so libc falls back to
clone, whose flags a classic filter can see (clone3 passes them in memory, out of its reach)."""

import errno
import struct

from fabric import syscalls
from fabric.syscalls import Arch

X32_SYSCALL_BIT = 0x40000000

# The calls denied, by name: each architecture's numbers come from fabric.syscalls (a call an
# architecture lacks, such as iopl or uselib on aarch64, needs no rule there).
DENIED = (
    "ptrace", "syslog", "uselib", "ustat", "sysfs", "vhangup", "pivot_root", "_sysctl", "chroot",
    "acct", "settimeofday", "mount", "umount2", "swapon", "swapoff", "reboot", "sethostname",
    "setdomainname", "iopl", "ioperm", "create_module", "init_module", "delete_module",
    "get_kernel_syms", "query_module", "quotactl", "nfsservctl", "lookup_dcookie",
    "clock_settime", "mbind", "set_mempolicy", "get_mempolicy", "kexec_load", "add_key",
    "request_key", "keyctl", "unshare", "move_pages", "perf_event_open", "fanotify_init",
    "name_to_handle_at", "open_by_handle_at", "clock_adjtime", "setns", "process_vm_readv",
    "process_vm_writev", "kcmp", "finit_module", "kexec_file_load", "bpf", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "quotactl_fd",
)  # fmt: skip


def denied_numbers(arch: Arch) -> dict[str, int]:
    return {name: arch.numbers[name] for name in DENIED if name in arch.numbers}


CLONE_NAMESPACE_FLAGS = 0x7E020000  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10
AF_NETLINK = 16
AF_PACKET = 17
NETLINK_ROUTE = 0
SOCK_RAW = 3
SOCK_TYPE_MASK = 0xF

# Classic BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h).
LD_W_ABS = 0x20
ALU_AND_K = 0x54
JEQ_K = 0x15
JGE_K = 0x35
JSET_K = 0x45
RET_K = 0x06
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000
OFFSET_NR = 0
OFFSET_ARCH = 4


def arg_offset(index: int) -> int:
    """Offset of the low 32 bits of syscall argument `index` in struct seccomp_data."""
    return 16 + 8 * index


Insn = tuple[int, int, int, int]  # (code, jt, jf, k)
Jump = int | str  # a relative offset, or a label resolved by `_assemble`


def _assemble(lines: list[tuple]) -> list[Insn]:
    """Resolve labels: a line is ("label", name) or (code, k[, jt[, jf]]) with jt/jf offsets or labels."""
    positions, index = {}, 0
    for line in lines:
        if line[0] == "label":
            positions[line[1]] = index
        else:
            index += 1
    program: list[Insn] = []
    for line in lines:
        if line[0] == "label":
            continue
        code, k, jt, jf = (*line, 0, 0)[:4]
        here = len(program) + 1
        program.append((code, _offset(jt, positions, here), _offset(jf, positions, here), k))
    return program


def _offset(target: Jump, positions: dict[str, int], here: int) -> int:
    return target if isinstance(target, int) else positions[target] - here


def deny_list_program(arch: Arch | None = None) -> list[Insn]:
    """The filter as (code, jt, jf, k) instructions, for `arch` (this machine's by default)."""
    arch = arch or syscalls.here()
    numbers = arch.numbers
    eperm = RET_ERRNO | errno.EPERM
    lines: list[tuple] = [
        (LD_W_ABS, OFFSET_ARCH),
        (JEQ_K, arch.audit_arch, "syscall"),
        (RET_K, RET_KILL_PROCESS),  # a foreign ABI could dodge every number below
        ("label", "syscall"),
        (LD_W_ABS, OFFSET_NR),
    ]
    if arch.name == "x86_64":
        lines.append((JGE_K, X32_SYSCALL_BIT, "kill"))  # the x32 ABI: its numbers would dodge the list
    lines += [(JEQ_K, number, "deny") for number in sorted(denied_numbers(arch).values())]
    lines += [
        (JEQ_K, numbers["clone3"], "enosys"),
        (JEQ_K, numbers["clone"], "clone"),
        (JEQ_K, numbers["socket"], "socket"),
        (RET_K, RET_ALLOW),
        ("label", "clone"),
        (LD_W_ABS, arg_offset(0)),
        (JSET_K, CLONE_NAMESPACE_FLAGS, "deny", "allow"),
        # Families allowed: unix, IP (not raw: netlink's routing sockets are SOCK_RAW too, so the
        # type is checked for IP only), and netlink's routing protocol, which glibc needs.
        ("label", "socket"),
        (LD_W_ABS, arg_offset(0)),
        (JEQ_K, AF_UNIX, "allow"),
        (JEQ_K, AF_INET, "socket_type"),
        (JEQ_K, AF_INET6, "socket_type"),
        (JEQ_K, AF_NETLINK, "netlink", "deny"),
        ("label", "netlink"),
        (LD_W_ABS, arg_offset(2)),
        (JEQ_K, NETLINK_ROUTE, "allow", "deny"),
        ("label", "socket_type"),
        (LD_W_ABS, arg_offset(1)),
        (ALU_AND_K, SOCK_TYPE_MASK),
        (JEQ_K, SOCK_RAW, "deny", "allow"),
        ("label", "enosys"),
        (RET_K, RET_ERRNO | errno.ENOSYS),
        ("label", "deny"),
        (RET_K, eperm),
        ("label", "kill"),
        (RET_K, RET_KILL_PROCESS),
        ("label", "allow"),
        (RET_K, RET_ALLOW),
    ]
    return _assemble(lines)


def encode(program: list[tuple[int, int, int, int]]) -> bytes:
    """struct sock_filter[]: u16 code, u8 jt, u8 jf, u32 k, native byte order."""
    return b"".join(struct.pack("=HBBI", code, jt, jf, k) for code, jt, jf, k in program)


# What instances forked from one template would otherwise share through the namespaces they share
# with it (docs/architecture.md §4, "fork from a template"): System V IPC and POSIX message queues
# (the IPC namespace), and UDP on loopback (the network namespace; TCP is fenced by Landlock).
FORK_FENCED = (
    "shmget", "shmat", "shmctl", "semget", "semop", "semctl", "semtimedop", "msgget", "msgsnd",
    "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify",
    "mq_getsetattr",
)  # fmt: skip
SOCK_DGRAM = 2


def fork_fence_program(arch: Arch | None = None) -> list[Insn]:
    """A filter a forked instance stacks on the sandbox's (filters only add): it refuses, EPERM,
    the calls through which it could reach a sibling in the namespaces they share."""
    arch = arch or syscalls.here()
    numbers = arch.numbers
    lines: list[tuple] = [
        (LD_W_ABS, OFFSET_ARCH),
        (JEQ_K, arch.audit_arch, "syscall"),
        (RET_K, RET_KILL_PROCESS),
        ("label", "syscall"),
        (LD_W_ABS, OFFSET_NR),
    ]
    lines += [(JEQ_K, numbers[name], "deny") for name in FORK_FENCED if name in numbers]
    lines += [
        (JEQ_K, numbers["socket"], "socket"),
        (RET_K, RET_ALLOW),
        ("label", "socket"),
        (LD_W_ABS, arg_offset(0)),
        (JEQ_K, AF_INET, "socket_type"),
        (JEQ_K, AF_INET6, "socket_type", "allow"),
        ("label", "socket_type"),
        (LD_W_ABS, arg_offset(1)),
        (ALU_AND_K, SOCK_TYPE_MASK),
        (JEQ_K, SOCK_DGRAM, "deny", "allow"),
        ("label", "deny"),
        (RET_K, RET_ERRNO | errno.EPERM),
        ("label", "allow"),
        (RET_K, RET_ALLOW),
    ]
    return _assemble(lines)
