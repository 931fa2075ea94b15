"""Starting a function's process through the node's spawner, recording the start's phases."""

import os
import socket
from pathlib import Path

from fabric import telemetry
from host_node.runtimes.errors import FunctionFailed
from host_node.sandbox.cgroups import Limits
from host_node.spawner import Process, Spawner, SpawnFailed


async def launch(
    spawner: Spawner,
    argv: list[str],
    code_dir: Path | None,
    limits: Limits,
    fds: list[int],
    phases: dict[str, float],
    deps_dir: Path | None = None,
) -> Process:
    try:
        proc = await spawner.start(argv, code_dir, limits, fds, deps_dir)
    except SpawnFailed as exc:
        raise FunctionFailed("function_error", str(exc.strerror or exc)) from None
    if proc.phases is not None:
        phases["slot_acquire_ms"] = round(proc.phases.slot_acquire_us / 1000, 3)
        phases["sandbox_setup_ms"] = round(proc.phases.sandbox_setup_us / 1000, 3)
        phases["exec_ms"] = round(proc.phases.exec_us / 1000, 3)
        describe(proc)
    return proc


def describe(proc: Process) -> None:
    """Where the invocation's process runs, on its span (for its trace; kernel events are found
    by the host pid)."""
    if (span := telemetry.current()) is None or proc.phases is None:
        return
    span.set_attribute("hetfaas.shard", getattr(proc, "shard", -1))
    span.set_attribute("hetfaas.host_pid", proc.pid)
    span.set_attribute("hetfaas.slot", getattr(proc, "slot", ""))
    span.set_attribute("hetfaas.prewarmed", proc.phases.prewarmed)
    span.set_attribute("hetfaas.slot_reused", proc.phases.slot_reused)
    span.set_attribute("hetfaas.borrowed", proc.phases.borrowed)


async def launch_worker(
    spawner: Spawner,
    argv: list[str],
    code_dir: Path | None,
    limits: Limits,
    log_fd: int | None,
    phases: dict[str, float],
    deps_dir: Path | None = None,
) -> tuple[Process, socket.socket]:
    """A python worker: stdin from /dev/null, stdout and stderr to `log_fd` (/dev/null when
    None: a stem cell gets its function's log later), its socket to the node as fd 3. Returns
    the process and the node's end of the socket."""
    parent, child = socket.socketpair()
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    out = devnull if log_fd is None else log_fd
    try:
        proc = await launch(
            spawner, argv, code_dir, limits, [devnull, out, out, child.fileno()], phases, deps_dir
        )
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
        os.close(devnull)
    return proc, parent
