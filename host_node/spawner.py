"""How a host node starts function processes: the interface the runtimes use, and `PlainSpawner`,
unsandboxed child processes for development without root. The secure sandboxes from sharded
cgroup pools (`host_node.sandbox.agent.ShardedSpawner`) implement the same interface."""

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import msgspec

from fabric import metrics
from host_node.sandbox import forks
from host_node.sandbox.cgroups import Limits
from host_node.sandbox.protocol import Phases
from schemas.messages import PoolShard

RUNTIME_DIR = Path(__file__).resolve().with_name("runtimes")
FUNCTION_PATH = "/usr/local/bin:/usr/bin:/bin"


class View(msgspec.Struct, frozen=True):
    """Paths as the function's process sees them."""

    code_dir: str
    runtime_dir: str
    python: str
    deps_dir: str = ""  # the function's dependency layer, if it has one


class Process(Protocol):
    pid: int
    phases: Phases | None
    exited: "asyncio.Future[int]"  # exit status, or -N when killed by signal N
    oom_killed: bool  # set before `exited` completes: the kernel's OOM killer struck
    cpu_s: float | None  # set before `exited` completes: CPU it (and what it started) used; None unknown

    def kill(self) -> None:
        """Kill the process and everything it started."""


class Spawner(Protocol):
    def view(self, code_dir: Path | None, deps_dir: Path | None = None) -> View: ...

    async def start(
        self,
        argv: list[str],
        code_dir: Path | None,
        limits: Limits,
        fds: list[int],
        deps_dir: Path | None = None,
    ) -> Process:
        """Start argv with fds[i] as its fd i (0, 1, 2, then extra), with the function's code
        and dependency layer in view. The caller keeps its fds. With no `code_dir` this is a
        stem cell, given its function later by `assign`."""
        ...

    async def assign(self, proc: Any, code_dir: Path, deps_dir: Path | None, limits: Limits) -> float:
        """Give a stem cell its function's limits, code and layer; µs it took."""
        ...

    async def adopt(self, template: Any, pidfd: int, limits: Limits) -> Process:
        """The process a template forked (its pidfd), in a cgroup of its own with `limits`."""
        ...

    def states(self) -> list[PoolShard]:
        """The pool's shards, for heartbeats and `hetfaas status` (empty when there is no pool)."""
        ...

    async def close(self) -> None: ...


async def death_of(proc: Process, grace_s: float = 1.0) -> str:
    """Why a process died on us, once its exit is known (a moment after its pipes closed)."""
    try:
        status = await asyncio.wait_for(asyncio.shield(proc.exited), grace_s)
    except TimeoutError:
        return "it stopped responding"
    if proc.oom_killed:
        return "it ran out of memory (the function's memory_mb) and the kernel killed it"
    return f"it was killed by signal {-status}" if status < 0 else f"it exited with status {status}"


class SpawnFailed(OSError):
    """The process could not be started (a missing command, a sandbox that failed to set up)."""


def function_env() -> dict[str, str]:
    return {"PATH": FUNCTION_PATH, "LANG": "C.UTF-8", "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}


class PlainProcess:
    def __init__(self, pid: int, spawn_us: float):
        self.pid = pid
        self.phases: Phases | None = Phases(
            slot_acquire_us=0, sandbox_setup_us=0, exec_us=spawn_us, prewarmed=False, slot_reused=False
        )
        self.oom_killed = False
        self.cpu_s: float | None = None
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = loop.create_future()
        self._pidfd = os.pidfd_open(pid)
        loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        _, status, usage = os.wait4(self.pid, 0)  # its children's too, those it waited for
        self.cpu_s = usage.ru_utime + usage.ru_stime
        if not self.exited.done():
            self.exited.set_result(os.waitstatus_to_exitcode(status))

    def kill(self) -> None:
        if self.exited.done():
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)  # its own session: the group is everything it started
        except ProcessLookupError:
            pass


class ForkedProcess:
    """A template's fork in plain mode: not our child (its template reaps it), known by its pidfd."""

    def __init__(self, pidfd: int):
        self._pidfd = pidfd
        self.pid = forks.pid_of(pidfd)
        self.phases: Phases | None = None
        self.oom_killed = False
        self.cpu_s: float | None = None  # its template reaps it: counted up to the last reading
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = loop.create_future()
        loop.add_reader(pidfd, self._gone)

    def _gone(self) -> None:
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        if not self.exited.done():
            self.exited.set_result(0)  # its status is its template's to read

    def kill(self) -> None:
        if not self.exited.done():
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass


class PlainSpawner:
    """Plain child processes, each leading its own session. No isolation: development only."""

    def view(self, code_dir: Path | None, deps_dir: Path | None = None) -> View:
        return View(str(code_dir or ""), str(RUNTIME_DIR), sys.executable, str(deps_dir or ""))

    async def start(
        self,
        argv: list[str],
        code_dir: Path | None,
        limits: Limits,
        fds: list[int],
        deps_dir: Path | None = None,
    ) -> Process:
        actions = [(os.POSIX_SPAWN_DUP2, fd, number) for number, fd in enumerate(fds)]
        started = time.monotonic()
        try:
            pid = _spawn_in(code_dir or RUNTIME_DIR, argv, actions)
        except OSError as exc:
            raise SpawnFailed(exc.errno, f"cannot start {argv[0]!r}: {exc.strerror}") from None
        return PlainProcess(pid, (time.monotonic() - started) * 1e6)

    async def assign(self, proc: Any, code_dir: Path, deps_dir: Path | None, limits: Limits) -> float:
        return 0.0  # no sandbox: the stem cell reads the host's paths, and no limit applies

    async def adopt(self, template: Any, pidfd: int, limits: Limits) -> Process:
        return ForkedProcess(os.dup(pidfd))  # no cgroups here: no limit applies

    def states(self) -> list[PoolShard]:
        return []

    async def close(self) -> None:
        pass


def _spawn_in(cwd: Path, argv: list[str], actions: list) -> int:
    # posix_spawn has no working-directory option before Python 3.13: a shell changes into it
    # (chdir in the node would race its other threads).
    wrapper = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', str(cwd), *argv]
    return os.posix_spawn(wrapper[0], wrapper, function_env(), file_actions=actions, setsid=True)


def spawner_gauges(spawner: Spawner, registry: metrics.Registry = metrics.REGISTRY) -> None:
    """The sandbox pool's metrics: slots ready per shard, and slots created (its rate is the
    refill rate)."""

    def ready() -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for s in spawner.states():
            out[(str(s.shard), "free")] = s.free
            out[(str(s.shard), "prewarmed")] = s.prewarmed
        return out

    def created() -> dict[tuple[str, ...], float]:
        return {(str(s.shard),): s.created for s in spawner.states()}

    shard = ("hetfaas.shard", "hetfaas.slots")
    registry.gauge("hetfaas.pool.ready", "Sandbox slots ready per shard (free, prewarmed)", shard, ready)
    why = "Slots created per shard (rate() is the refill rate)"
    registry.gauge("hetfaas.pool.created", why, ("hetfaas.shard",), created, monotonic=True)
