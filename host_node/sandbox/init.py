"""What runs inside a freshly cloned sandbox, before the function's execve.

Runs in the child of a shard spawner's clone3, as root in new pid/mount/ipc/uts/net namespaces:
`prepare` builds the sandbox (cgroup attach where clone3 could not place it, a read-only root view,
/proc, /dev, /tmp, hostname, loopback); `enter` takes the function's code and fds, drops every
privilege, installs seccomp and execs. In prewarm mode the two are separated by a wait for the
launch. The child reports over its status socket: W (ready, waiting), R (about to exec), E (failed);
the socket is close-on-exec, so end-of-file after R means the execve succeeded."""

import fcntl
import os
import resource
import socket
import struct
import time
from typing import NoReturn

import msgspec

from host_node.sandbox import linux, seccomp

READY = b"W"
EXECUTING = b"R"
FAILED = b"E"
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
DEVICES = ("null", "zero", "full", "random", "urandom")
SKELETON = ("code", "proc", "tmp", "dev", "etc", ".old")
FD_STAGE = 100  # fds are staged above this while being renumbered 0, 1, 2, ...
STATUS_FD = 99


class RootPlan(msgspec.Struct, frozen=True, kw_only=True):
    """The sandbox's filesystem and identity, the same for every sandbox of a node."""

    mount_point: str  # an empty host directory the new root is mounted on (inside the sandbox only)
    ro_binds: list[str]  # host directories shown read-only at the same path (/usr, the python prefix)
    runtime_dir: str  # host directory of the runtimes, shown at RUNTIME_VIEW
    etc_files: list[str]  # entries of the host's /etc shown read-only
    tmp_size_mb: int
    hostname: str
    uid: int
    gid: int
    nofile: int


RUNTIME_VIEW = "/opt/hetfaas/runtime"
CODE_VIEW = "/code"


def report(status: socket.socket, kind: bytes, text: str = "") -> None:
    status.send(kind + text.encode(errors="replace")[:4000])


def prepare(plan: RootPlan, attach_files: list[str]) -> None:
    for path in attach_files:  # hybrid/v1: the controllers' cgroups, which clone3 cannot enter
        with open(path, "w") as f:
            f.write("0")
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    root = plan.mount_point
    linux.mount("tmpfs", root, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=755,size=1m")
    for name in SKELETON:
        os.mkdir(os.path.join(root, name))
    for name in ("bin", "lib", "lib64", "sbin"):
        _mirror_top_level(root, name)
    for path in plan.ro_binds:
        _bind(path, root + path, read_only=True)
    _bind(plan.runtime_dir, root + RUNTIME_VIEW, read_only=True)
    for name in plan.etc_files:
        _bind(os.path.join("/etc", name), os.path.join(root, "etc", name), read_only=True)
    _populate_dev(os.path.join(root, "dev"))
    tmp_options = f"mode=1777,size={plan.tmp_size_mb}m"
    linux.mount("tmpfs", os.path.join(root, "tmp"), "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, tmp_options)
    os.chdir(root)
    linux.pivot_root(".", ".old")
    linux.umount2("/.old", linux.MNT_DETACH)
    os.rmdir("/.old")
    os.chdir("/")
    linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    linux.mount(None, "/", None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY)
    linux.sethostname(plan.hostname)
    _loopback_up()
    linux.drop_bounding_set()  # no execve in here may regain a capability; done ahead of the launch


def _mirror_top_level(root: str, name: str) -> None:
    """/bin, /lib... as the host has them: symlinks into /usr on merged-/usr systems, else binds."""
    host = "/" + name
    if os.path.islink(host):
        os.symlink(os.readlink(host), os.path.join(root, name))
    elif os.path.isdir(host):
        _bind(host, os.path.join(root, name), read_only=True)


def _bind(source: str, target: str, read_only: bool, nodev: bool = True) -> None:
    if os.path.isdir(source):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        open(target, "a").close()
    linux.mount(source, target, None, linux.MS_BIND | linux.MS_REC)
    flags = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_NOSUID | (linux.MS_NODEV if nodev else 0)
    linux.mount(None, target, None, flags | (linux.MS_RDONLY if read_only else 0))


def _populate_dev(dev: str) -> None:
    linux.mount("tmpfs", dev, "tmpfs", linux.MS_NOSUID | linux.MS_NOEXEC, "mode=755,size=64k")
    for name in DEVICES:
        _bind("/dev/" + name, os.path.join(dev, name), read_only=False, nodev=False)
    os.symlink("/proc/self/fd", os.path.join(dev, "fd"))
    for number, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{number}", os.path.join(dev, name))


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", IFF_UP))


def enter(
    plan: RootPlan,
    status: socket.socket,
    code_tree_fd: int,
    fds: list[int],
    argv: list[str],
    env: dict[str, str],
) -> NoReturn:
    """Mount the code, renumber fds, drop privileges, seccomp, execve. Reports E on any failure."""
    try:
        linux.move_mount(code_tree_fd, CODE_VIEW)
        os.close(code_tree_fd)
        os.chdir(CODE_VIEW)
        status_fd = _renumber(fds, status.fileno())
        status = socket.socket(fileno=status_fd)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (plan.nofile, plan.nofile))
        os.setgroups([])
        os.setresgid(plan.gid, plan.gid, plan.gid)
        os.setresuid(plan.uid, plan.uid, plan.uid)  # clears the permitted and effective sets
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
        linux.install_seccomp(SECCOMP_PROGRAM)
        report(status, EXECUTING, repr(time.monotonic()))
        os.execvpe(argv[0], argv, env)
    except BaseException as exc:
        _fail(status, f"cannot start {argv[0]!r}: {exc}")
    os._exit(127)


def _renumber(fds: list[int], status_fd: int) -> int:
    """Make fds[i] the sandbox's fd i, keep the status socket, close every other inherited fd."""
    status_fd = fcntl.fcntl(status_fd, fcntl.F_DUPFD_CLOEXEC, STATUS_FD)
    staged = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, FD_STAGE) for fd in fds]
    for number, fd in enumerate(staged):
        os.dup2(fd, number)
    os.closerange(len(fds), status_fd)
    os.closerange(status_fd + 1, 1 << 20)
    return status_fd


def close_inherited(keep: list[int]) -> None:
    """Right after clone: drop the spawner's other fds (other sandboxes' pipes must not stay open here)."""
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def _fail(status: socket.socket, message: str) -> NoReturn:
    try:
        report(status, FAILED, message)
    finally:
        os._exit(127)


SECCOMP_PROGRAM = seccomp.encode(seccomp.deny_list_program())
