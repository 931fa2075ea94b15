"""The Linux system calls the sandbox needs and CPython (3.11) does not wrap, through ctypes.

`PyDLL` rather than `CDLL`: the GIL stays held across the call, which is what a process that
just cloned itself must do (no other thread may run Python code in the child)."""

import ctypes
import os
import platform

_libc = ctypes.PyDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# Numbers differ by architecture only for the old calls; the new ones are asm-generic.
_SYSCALLS = {
    "x86_64": {"pivot_root": 155},
    "aarch64": {"pivot_root": 41},
}
SYS = _SYSCALLS.get(platform.machine(), {}) | {
    "open_tree": 428,
    "move_mount": 429,
    "clone3": 435,
    "mount_setattr": 442,
}

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_PIDFD = 0x00001000
CLONE_INTO_CGROUP = 0x200000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4

PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _path(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


class CloneArgs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "flags",
            "pidfd",
            "child_tid",
            "parent_tid",
            "exit_signal",
            "stack",
            "stack_size",
            "tls",
            "set_tid",
            "set_tid_size",
            "cgroup",
        )
    ]


def clone3(flags: int, cgroup_fd: int = -1) -> tuple[int, int]:
    """Fork-like clone3: returns (pid, pidfd) in the parent and (0, -1) in the child.

    The child must only set itself up and exec or `os._exit`: Python's at-fork hooks do not run."""
    pidfd = ctypes.c_int(-1)
    args = CloneArgs(flags=flags | CLONE_PIDFD, pidfd=ctypes.addressof(pidfd), exit_signal=17)
    if cgroup_fd >= 0:
        args.flags |= CLONE_INTO_CGROUP
        args.cgroup = cgroup_fd
    pid = _check(_libc.syscall(SYS["clone3"], ctypes.byref(args), ctypes.sizeof(args)), "clone3")
    return (pid, pidfd.value) if pid else (0, -1)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    result = _libc.mount(_path(source), _path(target), _path(fstype), ctypes.c_ulong(flags), _path(data))
    _check(result, f"mount {target}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(_path(target), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(SYS["pivot_root"], _path(new_root), _path(put_old)), "pivot_root")


def open_tree_clone(path: str) -> int:
    """A detached, read-only copy of the mount at `path`, as an fd another mount namespace can take."""
    fd = _check(
        _libc.syscall(SYS["open_tree"], -100, _path(path), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
        f"open_tree {path}",
    )
    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)
    try:
        _check(
            _libc.syscall(SYS["mount_setattr"], fd, b"", AT_EMPTY_PATH | AT_RECURSIVE, attr, 32),
            "mount_setattr",
        )
    except OSError:
        os.close(fd)
        raise
    return fd


def move_mount(tree_fd: int, target: str) -> None:
    result = _libc.syscall(SYS["move_mount"], tree_fd, b"", -100, _path(target), MOVE_MOUNT_F_EMPTY_PATH)
    _check(result, f"move_mount {target}")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def act_as_owner(uid: int) -> None:
    """Effective uid `uid` (what the kernel makes a new user namespace's owner), filesystem uid
    still 0 (which keeps the filesystem capabilities: writing root's cgroup files, walking its
    0700 directories). `os.seteuid(0)` undoes both. Single-threaded callers only: glibc's
    setfsuid changes the calling thread alone."""
    os.seteuid(uid)
    _libc.setfsuid(0)
    if _libc.setfsuid(-1) != 0:  # setfsuid reports the previous value, never an error
        os.seteuid(0)
        raise OSError(1, f"cannot keep filesystem uid 0 while acting as {uid}")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> None:
    args = (ctypes.c_ulong(a) for a in (arg2, arg3, arg4, arg5))
    _check(_libc.prctl(option, *args), f"prctl({option})")
