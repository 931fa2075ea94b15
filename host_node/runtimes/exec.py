"""exec functions: one process per invocation, payload on stdin, output from stdout."""

import asyncio
from pathlib import Path

from host_node.runtimes.errors import FunctionFailed
from host_node.spawner import Spawner, kill_group

STDERR_TAIL = 2000


async def run_exec(
    spawner: Spawner, command: list[str], code_dir: Path, payload: bytes, timeout_s: float, max_output: int
) -> bytes:
    try:
        proc = await spawner.spawn(
            command,
            cwd=str(code_dir),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise FunctionFailed("function_error", f"cannot start {command[0]!r}: {exc.strerror}") from None
    try:
        async with asyncio.timeout(timeout_s):
            output, stderr, code = await _communicate(proc, payload, max_output)
    except TimeoutError:
        raise FunctionFailed("timeout", f"command did not finish within {timeout_s * 1000:.0f} ms") from None
    finally:
        kill_group(proc)  # also reaps anything the command left running in its group
    if code != 0:
        tail = stderr[-STDERR_TAIL:].decode(errors="replace")
        raise FunctionFailed("function_error", f"command exited with status {code}", tail or None)
    return output


async def _communicate(
    proc: asyncio.subprocess.Process, payload: bytes, max_output: int
) -> tuple[bytes, bytes, int]:
    assert proc.stdin and proc.stdout and proc.stderr
    helpers = [asyncio.ensure_future(_feed(proc.stdin, payload)), asyncio.ensure_future(_tail(proc.stderr))]
    try:
        chunks, total = [], 0
        while chunk := await proc.stdout.read(1 << 16):
            total += len(chunk)
            if total > max_output:
                raise FunctionFailed(
                    "function_error", f"output is over the node's limit of {max_output} bytes"
                )
            chunks.append(chunk)
        await helpers[0]
        stderr = await helpers[1] or b""
        return b"".join(chunks), stderr, await proc.wait()
    finally:
        for helper in helpers:
            helper.cancel()


async def _tail(stream: asyncio.StreamReader) -> bytes:
    """Read a stream to its end, keeping only the last STDERR_TAIL bytes (the part that explains)."""
    tail = b""
    while chunk := await stream.read(1 << 16):
        tail = (tail + chunk)[-STDERR_TAIL:]
    return tail


async def _feed(stdin: asyncio.StreamWriter, payload: bytes) -> None:
    try:
        if payload:
            stdin.write(payload)
            await stdin.drain()
    except (BrokenPipeError, ConnectionResetError, RuntimeError):
        pass  # the command need not read its input (RuntimeError: uvloop's word for a closed pipe)
    finally:
        stdin.close()
