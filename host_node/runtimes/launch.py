"""Starting a function's process through the node's spawner, recording the start's phases."""

from pathlib import Path

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
    return proc
