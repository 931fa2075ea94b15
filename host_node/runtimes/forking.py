"""A template's side of forking (run in the template's sandbox, imported by python_worker.py only
when it is a template). Stdlib only.

A template is an instance that imported its handler (and so its dependencies) and then, instead
of serving invocations, forks instances of its function on the node's word (FORK). Each fork
shares the template's namespaces, uid and sandbox, so before it reports (FORKED, with its pidfd,
so the node can have the shard move it into a cgroup slot of its own) it fences itself off from
its siblings and its template, with what an unprivileged process may do to itself and never undo:

- a session of its own (its process group is its alone);
- Landlock (Linux 6.12, ABI 6): no filesystem access but reading and executing outside /tmp,
  and everything only beneath its own directory there (`TMPDIR`); no TCP port bound; no signal
  to, no ptrace of (so no /proc/PID/mem, fd, environ), no abstract unix socket of, any process
  outside its own domain;
- a seccomp filter stacked on the sandbox's (the node's `seccomp.fork_fence_program`): no
  System V IPC, no POSIX message queue, no UDP socket.

It then waits for GO (it is in its own cgroup by then) and becomes an instance of the function.
All of this runs before any invocation reaches the fork: an input cannot undo it. Only the
function's own code, imported in the template, could skip it, and what it would reach is
instances of itself.
"""

import ctypes
import json
import os
import shutil
import signal
import socket
import struct
import sys
import traceback
from collections import deque
from collections.abc import Callable

import protocol

LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
NEEDED_ABI = 6  # signal and abstract unix socket scoping (Linux 6.12)
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1, 2, 4, 8
FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
IOCTL_DEV = 1 << 15
BIND_TCP = 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
READ_ONLY = EXECUTE | READ_FILE | READ_DIR
MAX_FORK_FRAME = 16 * 1024
_libc = ctypes.CDLL(None, use_errno=True)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: none, or disabled)."""
    version = _libc.syscall(LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    return max(version, 0)


def _check(result: int, what: str) -> int:
    if result < 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")
    return result


def fence_filesystem_and_peers(own_dir: str) -> None:
    """Landlock: read and execute everywhere but /tmp, everything beneath `own_dir`; no TCP
    bind; signals and abstract unix sockets only within this process's own domain."""
    abi = landlock_abi()
    if abi < NEEDED_ABI:
        raise OSError(0, f"Landlock ABI {abi}: forked instances need ABI {NEEDED_ABI} (Linux 6.12)")
    everything = FS_RIGHTS_BY_ABI[min(abi, 5)]
    attr = struct.pack("=QQQ", everything, BIND_TCP, SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL)
    ruleset = _check(_libc.syscall(LANDLOCK_CREATE_RULESET, attr, len(attr), 0), "landlock_create_ruleset")
    try:
        for name in sorted(os.listdir("/")):
            if name != "tmp":
                rights = READ_ONLY | (WRITE_FILE | IOCTL_DEV if name == "dev" else 0)
                _allow(ruleset, "/" + name, rights & everything)
        _allow(ruleset, own_dir, everything)
        _check(_libc.syscall(LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)


def _allow(ruleset: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # a dangling link at the root (a host without /lib64, say): nothing to reach there

    try:
        if not os.path.isdir(path):
            rights &= EXECUTE | WRITE_FILE | READ_FILE | IOCTL_DEV  # a file takes file rights only
        rule = struct.pack("=Qi", rights, fd)
        _check(
            _libc.syscall(LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, rule, 0),
            f"landlock rule {path}",
        )
    finally:
        os.close(fd)


def stack_seccomp(program: bytes) -> None:
    """Add the node's fence filter (struct sock_fprog) to this process's filters."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("=HxxxxxxQ", len(program) // 8, ctypes.addressof(buffer))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.c_char_p(fprog), 0, 0), "seccomp")


def isolate(meta: dict, fence: bytes) -> None:
    """A new fork's own fences (see the module's docstring), before it says FORKED."""
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    own_dir = meta["tmp"]
    os.mkdir(own_dir, 0o700)
    os.environ["TMPDIR"] = own_dir
    if (tempfile := sys.modules.get("tempfile")) is not None:
        tempfile.tempdir = None  # type: ignore[attr-defined]  # the template's import may have cached /tmp
    fence_filesystem_and_peers(own_dir)
    stack_seccomp(fence)


def serve_template(sock: socket.socket, become_instance: Callable[[socket.socket], None]) -> None:
    """Fork an instance per FORK until the node closes the socket; a fork that fails to fence
    itself says INIT_ERROR on its socket and exits. The socket is a stream: one read may hold
    several frames (a FORK_ENDED and the next FORK), and each FORK's socket arrives, in order,
    with the bytes of its own frame."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # forks are reaped by the kernel: no zombies
    data, sockets = b"", deque[int]()
    while True:
        while (need := _frame_length(data)) is None or len(data) < need:
            more, fds, _flags, _address = socket.recv_fds(sock, MAX_FORK_FRAME + protocol.HEADER.size, 4)
            if not more:
                return
            data += more
            sockets.extend(fds)
        _, kind = protocol.HEADER.unpack_from(data)
        body, data = data[protocol.HEADER.size : need], data[need:]
        if kind == protocol.FORK_ENDED:
            shutil.rmtree(f"/tmp/f{int(body)}", ignore_errors=True)
        elif kind == protocol.FORK and sockets:
            own = sockets.popleft()
            if os.fork() == 0:
                sock.close()
                for other in sockets:
                    os.close(other)
                _fork_main(socket.socket(fileno=own), body, become_instance)
            os.close(own)


def _frame_length(data: bytes) -> int | None:
    """The first frame's length with its header, once the header is in (SystemExit for a frame
    the node never sends: larger than any FORK)."""
    if len(data) < protocol.HEADER.size:
        return None
    size, _ = protocol.HEADER.unpack_from(data)
    if size > MAX_FORK_FRAME:
        raise SystemExit(1)
    return protocol.HEADER.size + size


def _fork_main(sock: socket.socket, body: bytes, become_instance: Callable[[socket.socket], None]) -> None:
    try:
        meta, _, fence = body.partition(b"\n")
        isolate(json.loads(meta), fence)
        pidfd = os.pidfd_open(os.getpid())
        socket.send_fds(sock, [protocol.frame(protocol.FORKED, b"")], [pidfd])
        os.close(pidfd)
        go = sock.recv(protocol.HEADER.size)
        if len(go) < protocol.HEADER.size or protocol.HEADER.unpack(go)[1] != protocol.GO:
            os._exit(0)  # the node let it go
        become_instance(sock)
    except BaseException:
        try:
            sock.sendall(
                protocol.frame(
                    protocol.INIT_ERROR, traceback.format_exc().encode()[-protocol.MAX_TEXT_FRAME :]
                )
            )
        finally:
            os._exit(1)
    os._exit(0)
