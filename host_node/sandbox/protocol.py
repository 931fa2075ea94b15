"""Messages between the node's agent and its shard spawners, one per SOCK_SEQPACKET datagram.

File descriptors travel beside a message as SCM_RIGHTS, in the order the message names them."""

import array
import socket

import msgspec

from host_node.sandbox.cgroups import Limits
from schemas.messages import PoolShard

MAX_MESSAGE = 1 << 16
MAX_FDS = 8


class Launch(msgspec.Struct, tag="launch", frozen=True, kw_only=True):
    """Start argv in a sandbox. Attached fds become the sandbox's 0, 1, 2, 3, ... in order."""

    id: int
    argv: list[str]
    env: dict[str, str]
    code_dir: str  # host path, mounted read-only at /code; "" for a stem cell (see Assign)
    limits: Limits
    deps_dir: str = ""  # host path of the function's dependency layer, mounted read-only at /deps


class Assign(msgspec.Struct, tag="assign", frozen=True, kw_only=True):
    """A stem cell (launched with no code) becomes a function's: its slot takes the function's
    limits, then its code and dependency layer are mounted, read-only, at /code and /deps."""

    id: int
    code_dir: str
    deps_dir: str = ""
    limits: Limits


class Adopt(msgspec.Struct, tag="adopt", frozen=True, kw_only=True):
    """A process forked by the sandbox of launch `template` (its pidfd beside this message): move
    it into a slot of its own with `limits`, and report it as launch `id` (Adopted, then Exited)."""

    id: int
    template: int
    limits: Limits


class Adopted(msgspec.Struct, tag="adopted", frozen=True, kw_only=True):
    id: int
    slot: str = ""
    error: str = ""  # why it was not taken (it is killed then)


class Kill(msgspec.Struct, tag="kill", frozen=True):
    id: int


class Stop(msgspec.Struct, tag="stop", frozen=True):
    pass


class Phases(msgspec.Struct, frozen=True, kw_only=True):
    slot_acquire_us: float
    sandbox_setup_us: float  # namespaces, mounts, cgroup attach (≈0 when prewarmed)
    exec_us: float  # privileges dropped, seccomp, execve
    prewarmed: bool
    slot_reused: bool  # a recycled slot rather than a fresh one
    borrowed: bool = False  # filled in by the agent


class Launched(msgspec.Struct, tag="launched", frozen=True, kw_only=True):
    id: int
    pid: int
    slot: str
    phases: Phases


class LaunchFailed(msgspec.Struct, tag="failed", frozen=True, kw_only=True):
    id: int
    message: str


class Assigned(msgspec.Struct, tag="assigned", frozen=True, kw_only=True):
    id: int
    error: str = ""  # why the sandbox could not be given the function (it is killed then)
    assign_us: float = 0.0  # limits written and trees mounted


class Exited(msgspec.Struct, tag="exited", frozen=True, kw_only=True):
    id: int
    status: int  # exit code, or -N when killed by signal N
    oom_killed: bool = False  # the kernel's OOM killer struck in the sandbox's cgroup
    cpu_s: float | None = None  # CPU its processes used since the function began (None: unknown)


ToShard = Launch | Assign | Adopt | Kill | Stop
FromShard = Launched | LaunchFailed | Assigned | Adopted | Exited | PoolShard

_encoder = msgspec.msgpack.Encoder()
to_shard = msgspec.msgpack.Decoder(ToShard)
from_shard = msgspec.msgpack.Decoder(FromShard)


def send(sock: socket.socket, message: msgspec.Struct, fds: list[int] = ()) -> None:  # type: ignore[assignment]
    send_bytes(sock, _encoder.encode(message), fds)


def send_bytes(sock: socket.socket, data: bytes, fds: list[int] = ()) -> None:  # type: ignore[assignment]
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


def receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One datagram and the fds beside it; b"" when the peer has gone."""
    data, ancillary, _flags, _addr = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4))
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)
