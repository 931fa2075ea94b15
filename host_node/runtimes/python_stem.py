"""Stem cells: python instances started in their sandbox before their function is known.

A stem cell is a sandbox (pid, mount, network... namespaces, its own cgroup slot, no privileges,
seccomp) whose interpreter has started and imported the worker, then waits. A cold start takes
one: the shard writes the function's limits on the slot and mounts its code and dependency layer
(`Spawner.assign`), and the worker is sent LOAD with the function's log beside it; it imports the
handler and says READY. The interpreter's start (~20 ms alone, much more in a burst) is then off
the start's path. Nothing of a tenant's runs in a stem cell before it is its function's, and it
serves that one function only, as a fresh instance does.
"""

import array
import asyncio
import json
import socket
import time
from pathlib import Path

from host_node.runtimes import protocol
from host_node.runtimes.errors import FunctionFailed
from host_node.runtimes.launch import describe, launch_worker
from host_node.runtimes.python import WORKER_FD, PythonInstance
from host_node.sandbox.cgroups import Limits
from host_node.spawner import Process, Spawner


class StemLost(Exception):
    """The stem cell could not take the function (it died idle, or the shard could not give it
    the function): the start goes the fresh way instead; the function is not at fault."""


class StemCell:
    def __init__(self, proc: Process, sock: socket.socket):
        self.proc = proc
        self._sock = sock

    @property
    def alive(self) -> bool:
        return not self.proc.exited.done()

    @classmethod
    async def start(cls, spawner: Spawner, limits: Limits, timeout_s: float) -> "StemCell":
        """A stem cell in a sandbox of `limits` (the idle size class), once its interpreter is up."""
        view = spawner.view(None)
        argv = [view.python, "-I", "-S", f"{view.runtime_dir}/python_worker.py", str(WORKER_FD), "--stem"]
        proc, parent = await launch_worker(spawner, argv, None, limits, None, {})
        parent.setblocking(False)
        try:
            async with asyncio.timeout(timeout_s):
                said = await asyncio.get_running_loop().sock_recv(parent, protocol.HEADER.size + 1)
        except BaseException:
            proc.kill()
            parent.close()
            raise
        if said != protocol.frame(protocol.STEM_READY, b""):
            proc.kill()
            parent.close()
            raise FunctionFailed("internal", f"a stem cell did not start: it said {said!r}")
        return cls(proc, parent)

    async def become(
        self,
        spawner: Spawner,
        handler: str,
        code_dir: Path,
        deps_dir: Path | None,
        log_fd: int,
        max_output: int,
        timeout_s: float,
        limits: Limits,
        phases: dict[str, float],
        payload_form: str = "bytes",
    ) -> PythonInstance:
        """This stem cell as an instance of the function: limits, code and layer (from the shard),
        then LOAD with the function's log. StemLost if it cannot take the function (it is killed
        then); FunctionFailed if the function's import fails, as for a fresh instance."""
        assigned = time.monotonic()
        try:
            assign_us = await spawner.assign(self.proc, code_dir, deps_dir, limits)
        except OSError as exc:
            self.kill()
            raise StemLost(f"a stem cell could not take the function: {exc}") from None
        phases["sandbox_assign_ms"] = round(assign_us / 1000, 3)
        describe(self.proc)
        view = spawner.view(code_dir, deps_dir)
        load = {
            "handler": handler,
            "code_dir": view.code_dir,
            "deps_dir": view.deps_dir,
            "max_output": max_output,
            "payload": payload_form,
        }
        data = protocol.frame(protocol.LOAD, json.dumps(load).encode())
        try:
            # A few hundred bytes into an empty socket buffer: sent whole at once, no waiting.
            self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [log_fd]))])
        except OSError as exc:
            self.kill()
            raise StemLost(f"a stem cell was lost: {exc}") from None
        remaining = timeout_s - (time.monotonic() - assigned)
        return await PythonInstance.ready(self.proc, self._sock, handler, max_output, remaining)

    def kill(self) -> None:
        self.proc.kill()
        self._sock.close()
