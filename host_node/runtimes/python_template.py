"""The node's side of a function's template (forking.py is the other side).

A template is a sandboxed instance of the function, with the function's limits, that imported
the handler and its dependencies, then forks instances of the function when asked. A fork starts
with everything the template imported, so its start is a fork and a cgroup move, not an
interpreter and the imports. It is its template's child in its template's namespaces, fenced off
from its siblings and the template by itself before any input reaches it (forking.py), and moved
by the shard into a cgroup slot of its own (sandbox/forks.py). docs/architecture.md §4 says why
that is safe.
"""

import array
import asyncio
import ctypes
import json
import os
import socket
import time

from host_node.runtimes import protocol
from host_node.runtimes.errors import FunctionFailed
from host_node.runtimes.launch import describe, launch_worker
from host_node.runtimes.python import NO_DEPS, WORKER_FD, FunctionCode, PythonInstance
from host_node.sandbox import seccomp
from host_node.sandbox.cgroups import Limits
from host_node.spawner import Process, Spawner

FENCE = seccomp.encode(seccomp.fork_fence_program())
LANDLOCK_ABI_NEEDED = 6  # forking.NEEDED_ABI: signal scoping (Linux 6.12)


def forks_possible() -> bool:
    """Whether this kernel has the Landlock a fork fences itself with (ABI 6, Linux 6.12)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(444, None, 0, 1) >= LANDLOCK_ABI_NEEDED  # landlock_create_ruleset(VERSION)


class ForkFailed(Exception):
    """The template could not fork an instance (it died, or the fork could not fence itself or
    be given its cgroup): the start goes another way; the template is dropped if it is dead."""


async def receive(sock: socket.socket, timeout_s: float, max_fds: int = 0) -> tuple[int, bytes, list[int]]:
    """One frame off a bare socket (kind, body, fds beside it)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                data, fds, _flags, _address = socket.recv_fds(sock, protocol.MAX_TEXT_FRAME + 64, max_fds)
                break
            except BlockingIOError:
                readable = loop.create_future()
                loop.add_reader(sock.fileno(), readable.set_result, None)
                try:
                    await readable
                finally:
                    loop.remove_reader(sock.fileno())
    if len(data) < protocol.HEADER.size:
        raise ConnectionError("the template's socket closed")
    size, kind = protocol.HEADER.unpack_from(data)
    return kind, data[protocol.HEADER.size : protocol.HEADER.size + size], fds


class Template:
    def __init__(self, proc: Process, sock: socket.socket, handler: str, max_output: int, limits: Limits):
        self.proc = proc
        self._sock = sock
        self._handler = handler
        self._max_output = max_output
        self._limits = limits
        self._forks = 0
        self.live_forks = 0
        self.last_used = time.monotonic()
        self.retired = False  # forks no more; stops once its last fork has

    @property
    def alive(self) -> bool:
        return not self.proc.exited.done()

    @classmethod
    async def start(
        cls,
        spawner: Spawner,
        handler: str,
        code: FunctionCode,
        log_fd: int,
        max_output: int,
        timeout_s: float,
        limits: Limits,
        payload_form: str = "bytes",
    ) -> "Template":
        """A sandbox with the function's limits, whose worker imported the handler and waits to fork."""
        view = spawner.view(code.code_dir, code.deps_dir)
        argv = [view.python, "-I", "-S", f"{view.runtime_dir}/python_worker.py", str(WORKER_FD), handler]
        # no empty argument: the sandbox's launch ends argv at one (hetfaas-waiter.c)
        argv += [view.code_dir, str(max_output), payload_form, view.deps_dir or NO_DEPS, "template"]
        proc, parent = await launch_worker(spawner, argv, code.code_dir, limits, log_fd, {}, code.deps_dir)
        parent.setblocking(False)
        try:
            kind, body, _ = await receive(parent, timeout_s)
        except (TimeoutError, ConnectionError, OSError) as exc:
            proc.kill()
            parent.close()
            raise FunctionFailed(
                "function_error", f"the template did not import its handler: {exc}"
            ) from None
        if kind != protocol.READY:
            proc.kill()
            parent.close()
            raise FunctionFailed(
                "function_error", f"the template of {handler} failed to load", body.decode(errors="replace")
            )
        return cls(proc, parent, handler, max_output, limits)

    async def fork(self, spawner: Spawner, timeout_s: float, phases: dict[str, float]) -> PythonInstance:
        """An instance forked from this template, in a cgroup of its own; ForkFailed if not."""
        if not self.alive or self.retired:
            raise ForkFailed("the template has exited" if not self.alive else "the template is retired")
        started = time.monotonic()
        self._forks += 1
        fork_id = self._forks
        ours, theirs = socket.socketpair()
        meta = json.dumps({"id": fork_id, "tmp": f"/tmp/f{fork_id}"}).encode()
        try:
            message = protocol.frame(protocol.FORK, meta + b"\n" + FENCE)
            self._sock.sendmsg(
                [message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [theirs.fileno()]))]
            )
        except OSError as exc:
            ours.close()
            raise ForkFailed(f"the template is gone: {exc}") from None
        finally:
            theirs.close()
        ours.setblocking(False)
        try:
            kind, body, fds = await receive(ours, timeout_s, max_fds=1)
        except (TimeoutError, ConnectionError, OSError) as exc:
            ours.close()
            raise ForkFailed(f"the fork did not report: {str(exc) or type(exc).__name__}") from None
        if kind != protocol.FORKED or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            ours.close()
            raise ForkFailed(f"the fork could not fence itself: {body.decode(errors='replace')[-300:]}")
        pidfd = fds[0]
        try:
            proc = await spawner.adopt(self.proc, pidfd, self._limits)
        except OSError as exc:
            ours.close()
            raise ForkFailed(f"the fork could not have its own cgroup: {exc}") from None
        finally:
            os.close(pidfd)
        phases["template_fork_ms"] = round((time.monotonic() - started) * 1000, 3)
        describe(proc)
        self.last_used = time.monotonic()
        self.live_forks += 1
        proc.exited.add_done_callback(lambda _: self._ended(fork_id))
        try:
            ours.send(protocol.frame(protocol.GO, b""))
        except OSError as exc:  # it died after it was moved
            proc.kill()
            ours.close()
            raise ForkFailed(f"the fork was lost: {exc}") from None
        remaining = timeout_s - (time.monotonic() - started)
        return await PythonInstance.ready(proc, ours, self._handler, self._max_output, remaining)

    def _ended(self, fork_id: int) -> None:
        self.live_forks -= 1
        if self.retired and not self.live_forks:
            self.kill()
            return
        try:
            self._sock.send(protocol.frame(protocol.FORK_ENDED, str(fork_id).encode()))
        except OSError:
            pass  # the template is gone, and its /tmp with it

    def retire(self) -> None:
        """Fork no more, and stop once no fork is alive: its forks live in its pid namespace, so
        stopping it now would end the calls they are running."""
        self.retired = True
        if not self.live_forks:
            self.kill()

    def kill(self) -> None:
        self.proc.kill()
        self._sock.close()
