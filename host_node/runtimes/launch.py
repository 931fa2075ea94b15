"""Starting a function's process through the node's spawner, recording the start's phases."""

from pathlib import Path

from fabric import telemetry
from host_node.runtimes.errors import FunctionFailed
from host_node.sandbox.cgroups import Limits
from host_node.spawner import Process, Spawner, SpawnFailed


async def launch(
    spawner: Spawner,
    argv: list[str],
    code_dir: Path,
    limits: Limits,
    fds: list[int],
    phases: dict[str, float],
) -> Process:
    try:
        proc = await spawner.start(argv, code_dir, limits, fds)
    except SpawnFailed as exc:
        raise FunctionFailed("function_error", str(exc.strerror or exc)) from None
    if proc.phases is not None:
        phases["slot_acquire_ms"] = round(proc.phases.slot_acquire_us / 1000, 3)
        phases["sandbox_setup_ms"] = round(proc.phases.sandbox_setup_us / 1000, 3)
        phases["exec_ms"] = round(proc.phases.exec_us / 1000, 3)
        if (span := telemetry.current()) is not None:  # the invocation's span, for its trace
            span.set_attribute("hetfaas.shard", getattr(proc, "shard", -1))
            span.set_attribute("hetfaas.host_pid", proc.pid)  # kernel events are found by it
            span.set_attribute("hetfaas.slot", getattr(proc, "slot", ""))
            span.set_attribute("hetfaas.prewarmed", proc.phases.prewarmed)
            span.set_attribute("hetfaas.slot_reused", proc.phases.slot_reused)
            span.set_attribute("hetfaas.borrowed", proc.phases.borrowed)
    return proc
