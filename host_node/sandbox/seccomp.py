"""The sandbox's seccomp deny-list as a classic BPF program. Pure: builds bytes, loads nothing.

In the spirit of Docker's default profile: everything is allowed except calls that reach kernel-
wide state (mounts, modules, kexec, clocks, keys, bpf, perf, ptrace, namespaces, io_uring) and
sockets of any family but unix, IPv4/IPv6 (not raw) and netlink's routing protocol (which
glibc's getaddrinfo and if_nameindex use): no vsock, packet, uevent netlink, AF_ALG and the rest
of the kernel's rarely used, often buggy families. clone3 answers ENOSYS so libc falls back to
clone, whose flags a classic filter can see (clone3 passes them in memory, out of its reach)."""

import errno
import struct

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

# x86_64 numbers of the denied calls (arch/x86/entry/syscalls/syscall_64.tbl).
DENIED_X86_64 = {
    "ptrace": 101, "syslog": 103, "uselib": 134, "ustat": 136, "sysfs": 139, "vhangup": 153,
    "pivot_root": 155, "_sysctl": 156, "chroot": 161, "acct": 163, "settimeofday": 164,
    "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169,
    "sethostname": 170, "setdomainname": 171, "iopl": 172, "ioperm": 173, "create_module": 174,
    "init_module": 175, "delete_module": 176, "get_kernel_syms": 177, "query_module": 178,
    "quotactl": 179, "nfsservctl": 180, "lookup_dcookie": 212, "clock_settime": 227,
    "mbind": 237, "set_mempolicy": 238, "get_mempolicy": 239, "kexec_load": 246,
    "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272, "move_pages": 279,
    "perf_event_open": 298, "fanotify_init": 300, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310,
    "process_vm_writev": 311, "kcmp": 312, "finit_module": 313, "kexec_file_load": 320,
    "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442, "quotactl_fd": 443,
}  # fmt: skip
CLONE_X86_64 = 56
CLONE3_X86_64 = 435
SOCKET_X86_64 = 41
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


def deny_list_program() -> list[Insn]:
    """The filter as (code, jt, jf, k) instructions."""
    eperm = RET_ERRNO | errno.EPERM
    lines: list[tuple] = [
        (LD_W_ABS, OFFSET_ARCH),
        (JEQ_K, AUDIT_ARCH_X86_64, "syscall"),
        (RET_K, RET_KILL_PROCESS),  # a foreign ABI could dodge every number below
        ("label", "syscall"),
        (LD_W_ABS, OFFSET_NR),
        (JGE_K, X32_SYSCALL_BIT, "kill"),  # the x32 ABI: its numbers would dodge the list too
    ]
    lines += [(JEQ_K, number, "deny") for number in sorted(DENIED_X86_64.values())]
    lines += [
        (JEQ_K, CLONE3_X86_64, "enosys"),
        (JEQ_K, CLONE_X86_64, "clone"),
        (JEQ_K, SOCKET_X86_64, "socket"),
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
