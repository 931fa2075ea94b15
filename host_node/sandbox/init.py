"""What runs inside a freshly cloned sandbox, before the function's execve.

Runs in the child of a shard spawner's clone3, as root in new pid/mount/ipc/uts/net namespaces:
`prepare` builds the sandbox (cgroup attach where clone3 could not place it, a read-only root view,
/proc, /dev, /tmp, hostname, loopback); then the child execs hetfaas-waiter (hetfaas-waiter.c),
which waits for the launch, mounts the function's code, drops every privilege, installs seccomp
and execs the function. In prewarm mode the shard sends the launch when one comes; otherwise at
once. The child reports over its status socket: W (built, waiting: prewarm), R (about to exec),
E (failed); the socket is close-on-exec, so end-of-file after R means the execve succeeded."""

import fcntl
import os
import shutil
import socket
import struct
from typing import NoReturn

import msgspec

from host_node.sandbox import linux, seccomp, waiter

READY = b"W"
GO = b"M"  # parent -> child: your user namespace is mapped (and you are in your cgroups)
CODE_MOUNTED = 1  # activation flag: /code is in place (or none is wanted): no code tree fd
DEPS_TREE = 2  # activation flag: a dependency layer's tree follows the code's, for /deps
EXECUTING = b"R"
FAILED = b"E"
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
DEVICES = ("null", "zero", "full", "random", "urandom")
SKELETON = ("code", "deps", "proc", "tmp", "dev", "etc")


class RootPlan(msgspec.Struct, frozen=True, kw_only=True):
    """The sandbox's filesystem and identity, the same for every sandbox of a node."""

    mount_point: str  # an empty host directory the new root is mounted on (inside the sandbox only)
    ro_binds: list[str]  # host directories shown read-only at the same path (/usr, the python prefix)
    runtime_dir: str  # host directory of the runtimes, shown at RUNTIME_VIEW
    waiter: str  # host path of hetfaas-waiter, shown at waiter.VIEW
    etc_files: list[str]  # entries of the host's /etc shown read-only
    tmp_size_mb: int
    hostname: str
    uid: int  # in a user namespace, the id the function has in it; else the host's sandbox uid is used
    gid: int
    nofile: int
    own_counts: dict[str, int] = {}  # /proc/sys/user limits set in the sandbox's user namespace


RUNTIME_VIEW = "/opt/hetfaas/runtime"
CODE_VIEW = "/code"  # where hetfaas-waiter mounts the function's code
DEPS_VIEW = "/deps"  # where a function's dependency layer is mounted (cloning.mount_trees)


def report(status: socket.socket, kind: bytes, text: str = "") -> None:
    status.send(kind + text.encode(errors="replace")[:4000])


def build_template(plan: RootPlan) -> None:
    """Once per shard, in the shard's own private mount namespace: the read-only root view every
    sandbox of the shard gets a copy of with its mount namespace (so a start mounts 3 things, not 40)."""
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)  # nothing here reaches the host
    root = plan.mount_point
    linux.mount("tmpfs", root, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=755,size=4m")
    for name in SKELETON:
        os.mkdir(os.path.join(root, name))
    for name in ("bin", "lib", "lib64", "sbin"):
        _mirror_top_level(root, name)
    for path in plan.ro_binds:
        _bind(path, root + path, read_only=True)
    # Copies, not binds: a bind's mountinfo line names its host path (here the node's install).
    shutil.copytree(plan.runtime_dir, root + RUNTIME_VIEW, ignore=shutil.ignore_patterns("*.new"))
    os.makedirs(os.path.dirname(root + waiter.VIEW), mode=0o755, exist_ok=True)
    shutil.copy2(plan.waiter, root + waiter.VIEW)
    for name in plan.etc_files:
        _bind(os.path.join("/etc", name), os.path.join(root, "etc", name), read_only=True)
    _populate_dev(os.path.join(root, "dev"))
    linux.mount(None, root, None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | linux.MS_NOSUID)


def prepare(plan: RootPlan, attach_files: list[str], userns: bool) -> None:
    """In a new sandbox (its mount namespace a copy of the shard's): enter the template root with a
    private /tmp and a fresh /proc, leave the host's tree behind, name the host, bring up lo."""
    for path in attach_files:  # hybrid/v1: the controllers' cgroups, which clone3 cannot enter
        with open(path, "w") as f:
            f.write("0")
    root = plan.mount_point
    if userns:
        _limit_own_counts(plan.own_counts)
        # Mounts copied from the shard's (more privileged) namespace are locked, and pivot_root
        # refuses a locked new root: bind the template onto itself, which we own.
        linux.mount(root, root, None, linux.MS_BIND | linux.MS_REC)
    tmp_options = f"mode=1777,size={plan.tmp_size_mb}m"
    linux.mount("tmpfs", os.path.join(root, "tmp"), "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, tmp_options)
    # /proc before leaving the host's tree: in a user namespace the kernel lets us mount a proc
    # only while a full one is visible in our mount namespace. `subset=pid` (Linux 5.8) shows
    # only the processes' directories: every host-wide file (stat, meminfo, loadavg, pressure,
    # interrupts, config.gz, sys...) is absent, with no mount per file to hide it. glibc then
    # counts CPUs by the process's affinity (no /sys, no /proc/stat), which is the right count.
    proc_flags = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    linux.mount("proc", os.path.join(root, "proc"), "proc", proc_flags, "subset=pid")
    os.chdir(root)
    linux.pivot_root(".", ".")  # the old root ends up stacked on the new one: detach it
    linux.umount2(".", linux.MNT_DETACH)
    os.chdir("/")
    linux.sethostname(plan.hostname)
    _loopback_up()


def _limit_own_counts(counts: dict[str, int]) -> None:
    """The kernel's per-user counts as this sandbox's namespace sees them (namespace root may set
    them: CAP_SYS_RESOURCE in it). They bound the sandbox below the host's per-user limits,
    which bound it too, counted for the namespace's owner: the sandbox's own host uid."""
    for name, value in counts.items():
        fd = os.open(f"/proc/sys/user/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)


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


def map_ids(pid: int, root: int, uid: int, plan: RootPlan) -> None:
    """Parent side: the sandbox's root is host id `root` (no host id is root) and its function's
    uid and gid are the sandbox's own host id `uid`; no other id exists in it."""
    for name, inside in (("uid_map", plan.uid), ("gid_map", plan.gid)):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(f"0 {root} 1\n{inside} {uid} 1\n")


def become_namespace_root() -> None:
    """Child side, once mapped: we still carry the host's uid 0, which the namespace does not map;
    take the namespace's own 0 (host base) so that execve keeps our capabilities in it."""
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def exec_waiter(status: socket.socket) -> NoReturn:
    """Become hetfaas-waiter, which waits for the launch and does the last, quick steps in C."""
    try:
        status.set_inheritable(True)
        os.execv(waiter.VIEW, [waiter.VIEW, str(status.fileno())])
    except BaseException as exc:
        fail(status, f"cannot start hetfaas-waiter: {exc}")


def activation(plan: RootPlan, argv: list[str], env: dict[str, str], uid: int, gid: int, flags: int) -> bytes:
    """The launch as hetfaas-waiter reads it (see its source for the layout)."""
    head = struct.pack("=5I", flags, uid, gid, plan.nofile, len(SECCOMP_PROGRAM))
    strings = b"".join(os.fsencode(a) + b"\0" for a in argv) + b"\0"
    strings += b"".join(os.fsencode(f"{k}={v}") + b"\0" for k, v in env.items()) + b"\0"
    return head + SECCOMP_PROGRAM + strings


def close_inherited(keep: list[int]) -> None:
    """Right after clone: drop the spawner's other fds (other sandboxes' pipes must not stay open here)."""
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def fail(status: socket.socket, message: str) -> NoReturn:
    try:
        report(status, FAILED, message)
    finally:
        os._exit(127)


SECCOMP_PROGRAM = seccomp.encode(seccomp.deny_list_program())
