"""System call numbers and seccomp's audit arch, per architecture: hosts are x86_64, DPUs are
Arm (BlueField and most others are aarch64, whose generic table numbers everything differently
and lacks a dozen old x86 calls). Only the calls hetfaas makes or denies are named. Checked by
tests/unit/test_syscalls.py against each architecture's own <asm/unistd.h> (the aarch64 one built
with the cross compiler and run under qemu-user)."""

import platform

import msgspec


class Arch(msgspec.Struct, frozen=True):
    name: str
    audit_arch: int  # AUDIT_ARCH_* (linux/audit.h): what seccomp_data.arch says for this ABI
    numbers: dict[str, int]  # name -> number; a call the architecture lacks is absent


X86_64 = Arch(
    "x86_64",
    0xC000003E,
    {
    "read": 0, "execve": 59,
    "bpf": 321, "capset": 126, "clone": 56, "clone3": 435, "socket": 41, "ptrace": 101,
    "syslog": 103, "uselib": 134, "ustat": 136, "sysfs": 139, "vhangup": 153, "pivot_root": 155,
    "_sysctl": 156, "chroot": 161, "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166,
    "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171,
    "iopl": 172, "ioperm": 173, "create_module": 174, "init_module": 175, "delete_module": 176,
    "get_kernel_syms": 177, "query_module": 178, "quotactl": 179, "nfsservctl": 180,
    "lookup_dcookie": 212, "clock_settime": 227, "mbind": 237, "set_mempolicy": 238,
    "get_mempolicy": 239, "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250,
    "unshare": 272, "move_pages": 279, "perf_event_open": 298, "fanotify_init": 300,
    "name_to_handle_at": 303, "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313,
    "kexec_file_load": 320, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "mount_setattr": 442, "quotactl_fd": 443,
    "shmget": 29, "shmat": 30, "shmctl": 31, "semget": 64, "semop": 65, "semctl": 66,
    "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71, "semtimedop": 220, "mq_open": 240,
    "mq_unlink": 241, "mq_timedsend": 242, "mq_timedreceive": 243, "mq_notify": 244,
    "mq_getsetattr": 245,},
)  # fmt: skip
AARCH64 = Arch(
    "aarch64",
    0xC00000B7,
    {
    "read": 63, "execve": 221,
    "bpf": 280, "capset": 91, "clone": 220, "clone3": 435, "socket": 198, "ptrace": 117,
    "syslog": 116, "vhangup": 58, "pivot_root": 41, "chroot": 51, "acct": 89, "settimeofday": 170,
    "mount": 40, "umount2": 39, "swapon": 224, "swapoff": 225, "reboot": 142, "sethostname": 161,
    "setdomainname": 162, "init_module": 105, "delete_module": 106, "quotactl": 60,
    "nfsservctl": 42, "lookup_dcookie": 18, "clock_settime": 112, "mbind": 235,
    "set_mempolicy": 237, "get_mempolicy": 236, "kexec_load": 104, "add_key": 217,
    "request_key": 218, "keyctl": 219, "unshare": 97, "move_pages": 239, "perf_event_open": 241,
    "fanotify_init": 262, "name_to_handle_at": 264, "open_by_handle_at": 265, "clock_adjtime": 266,
    "setns": 268, "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272,
    "finit_module": 273, "kexec_file_load": 294, "userfaultfd": 282, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    "quotactl_fd": 443, "mq_open": 180, "mq_unlink": 181, "mq_timedsend": 182,
    "mq_timedreceive": 183, "mq_notify": 184, "mq_getsetattr": 185, "msgget": 186, "msgctl": 187,
    "msgrcv": 188, "msgsnd": 189, "semget": 190, "semctl": 191, "semtimedop": 192, "semop": 193,
    "shmget": 194, "shmctl": 195, "shmat": 196,
},
)  # fmt: skip
ARCHES = {a.name: a for a in (X86_64, AARCH64)}


class UnsupportedArch(RuntimeError):
    pass


def arch_named(machine: str) -> Arch:
    """The table for `machine` (uname -m; "arm64" is aarch64's other name)."""
    arch = ARCHES.get("aarch64" if machine == "arm64" else machine)
    if arch is None:
        raise UnsupportedArch(f"no system call table for {machine!r}: hetfaas runs on {', '.join(ARCHES)}")
    return arch


def here() -> Arch:
    return arch_named(platform.machine())
