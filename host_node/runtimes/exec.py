"""exec functions: one process per invocation, payload on stdin, output from stdout."""

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from host_node.runtimes.errors import FunctionFailed
from host_node.runtimes.launch import launch
from host_node.sandbox.cgroups import Limits
from host_node.spawner import Process, Spawner, death_of

STDERR_TAIL = 2000


async def run_exec(
    spawner: Spawner,
    command: list[str],
    code_dir: Path,
    payload: bytes,
    timeout_s: float,
    max_output: int,
    limits: Limits,
    phases: dict[str, float],
    started: Callable[[Process], None] = lambda _: None,
) -> bytes:
    """Run `command` once on `payload`; `started` is told of its process (for its CPU and memory)."""
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    stderr_r, stderr_w = os.pipe()
    try:
        proc = await launch(spawner, command, code_dir, limits, [stdin_r, stdout_w, stderr_w], phases)
    except BaseException:
        for fd in (stdin_w, stdout_r, stderr_r):
            os.close(fd)
        raise
    finally:
        for fd in (stdin_r, stdout_w, stderr_w):
            os.close(fd)
    started(proc)
    try:
        async with asyncio.timeout(timeout_s):
            output, stderr = await _communicate(stdin_w, stdout_r, stderr_r, payload, max_output)
            code = await proc.exited
    except TimeoutError:
        raise FunctionFailed("timeout", f"command did not finish within {timeout_s * 1000:.0f} ms") from None
    finally:
        proc.kill()  # whatever the command left running dies with it
    if code != 0:
        tail = stderr[-STDERR_TAIL:].decode(errors="replace")
        why = await death_of(proc) if proc.oom_killed or code < 0 else f"it exited with status {code}"
        raise FunctionFailed("function_error", f"command failed: {why}", tail or None)
    return output


async def _communicate(
    stdin_w: int, stdout_r: int, stderr_r: int, payload: bytes, max_output: int
) -> tuple[bytes, bytes]:
    """Feed the payload, collect stdout (up to max_output) and the tail of stderr. Plain fds and
    loop readers rather than transports and streams: this runs once per exec invocation."""
    loop = asyncio.get_running_loop()
    feeder = None
    if len(payload) <= PIPE_CAPACITY:
        _write_small(stdin_w, payload)  # fits in the pipe: no writer needed
    else:
        feeder, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(stdin_w, "wb", 0))
        feeder.write(payload)  # the command need not read it: a broken pipe just closes the feeder
        feeder.close()
    collector = _Collector(loop, stdout_r, stderr_r, max_output)
    try:
        return await collector.done
    finally:
        collector.close()
        if feeder is not None:
            feeder.abort()


PIPE_CAPACITY = 65536  # Linux's default pipe buffer


def _write_small(fd: int, payload: bytes) -> None:
    try:
        if payload:
            os.write(fd, payload)
    except BrokenPipeError:
        pass  # the command exited without reading: fine
    finally:
        os.close(fd)


class _Collector:
    def __init__(self, loop: asyncio.AbstractEventLoop, stdout_r: int, stderr_r: int, max_output: int):
        self._loop = loop
        self._open = {stdout_r, stderr_r}
        self._stdout_r = stdout_r
        self._max_output = max_output
        self.output = bytearray()
        self.stderr_tail = b""
        self.done: asyncio.Future[tuple[bytes, bytes]] = loop.create_future()
        for fd in (stdout_r, stderr_r):
            os.set_blocking(fd, False)
            loop.add_reader(fd, self._readable, fd)

    def _readable(self, fd: int) -> None:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            self._finish(fd)
        elif fd == self._stdout_r:
            self.output += chunk
            if len(self.output) > self._max_output and not self.done.done():
                message = f"output is over the node's limit of {self._max_output} bytes"
                self.done.set_exception(FunctionFailed("function_error", message))
        else:
            self.stderr_tail = (self.stderr_tail + chunk)[-STDERR_TAIL:]

    def _finish(self, fd: int) -> None:
        self._loop.remove_reader(fd)
        os.close(fd)
        self._open.discard(fd)
        if not self._open and not self.done.done():
            self.done.set_result((bytes(self.output), self.stderr_tail))

    def close(self) -> None:
        for fd in list(self._open):
            self._finish(fd)
