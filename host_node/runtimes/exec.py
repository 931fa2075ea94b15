"""exec functions: one process per invocation, payload on stdin, output from stdout."""

import asyncio
import os
from pathlib import Path

from host_node.runtimes.errors import FunctionFailed
from host_node.runtimes.launch import launch
from host_node.sandbox.cgroups import Limits
from host_node.spawner import Spawner, death_of

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
) -> bytes:
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
    loop = asyncio.get_running_loop()
    stdout, stderr = asyncio.StreamReader(), asyncio.StreamReader()
    # os.fdopen wraps the pipe fds we already hold; nothing here touches the disk
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdout), os.fdopen(stdout_r, "rb", 0))
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stderr), os.fdopen(stderr_r, "rb", 0))
    feeder, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(stdin_w, "wb", 0))
    if payload:
        feeder.write(payload)  # the command need not read it: a broken pipe just closes the feeder
    feeder.close()
    tail = asyncio.ensure_future(_tail(stderr))
    try:
        chunks, total = [], 0
        while chunk := await stdout.read(1 << 16):
            total += len(chunk)
            if total > max_output:
                raise FunctionFailed(
                    "function_error", f"output is over the node's limit of {max_output} bytes"
                )
            chunks.append(chunk)
        return b"".join(chunks), await tail
    finally:
        tail.cancel()
        feeder.abort()


async def _tail(stream: asyncio.StreamReader) -> bytes:
    """Read a stream to its end, keeping only the last STDERR_TAIL bytes (the part that explains)."""
    tail = b""
    while chunk := await stream.read(1 << 16):
        tail = (tail + chunk)[-STDERR_TAIL:]
    return tail
