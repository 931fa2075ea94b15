"""The node's side of a warm python instance (see python_worker.py for the other side)."""

import asyncio
import socket
import sys
from pathlib import Path
from typing import IO

from host_node.runtimes import protocol
from host_node.runtimes.errors import FunctionFailed
from host_node.spawner import Spawner, kill_group

WORKER = Path(__file__).with_name("python_worker.py")


class PythonInstance:
    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        init_ms: float,
    ):
        self._proc = proc
        self._reader = reader
        self._writer = writer
        self.init_ms = init_ms
        self.healthy = True

    @classmethod
    async def start(
        cls, spawner: Spawner, handler: str, code_dir: Path, log: IO[bytes], max_output: int, timeout_s: float
    ) -> "PythonInstance":
        parent, child = socket.socketpair()
        try:
            argv = [
                sys.executable,
                "-I",
                str(WORKER),
                str(child.fileno()),
                handler,
                str(code_dir),
                str(max_output),
            ]
            proc = await spawner.spawn(
                argv,
                cwd=str(code_dir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(child.fileno(),),
            )
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        try:
            async with asyncio.timeout(timeout_s):
                kind, body = await _read_frame(reader)
        except (TimeoutError, asyncio.IncompleteReadError) as exc:
            kill_group(proc)
            writer.close()
            why = "did not finish importing before the timeout" if isinstance(exc, TimeoutError) else "exited"
            raise FunctionFailed(
                "timeout" if isinstance(exc, TimeoutError) else "function_error",
                f"python instance {why} during init",
            ) from None
        if kind != protocol.READY:
            kill_group(proc)
            writer.close()
            raise FunctionFailed(
                "function_error", f"handler {handler} failed to load", body.decode(errors="replace")
            )
        return cls(proc, reader, writer, float(body))

    async def invoke(self, payload: bytes, timeout_s: float) -> bytes:
        """Run the handler once; any failure that leaves the worker unusable marks it unhealthy."""
        try:
            async with asyncio.timeout(timeout_s):
                self._writer.write(protocol.frame(protocol.INVOKE, payload))
                await self._writer.drain()
                kind, body = await _read_frame(self._reader)
        except TimeoutError:
            self.kill()
            raise FunctionFailed(
                "timeout", f"function did not return within {timeout_s * 1000:.0f} ms"
            ) from None
        except (asyncio.IncompleteReadError, ConnectionError):
            self.kill()
            raise FunctionFailed("function_error", "python instance died during the invocation") from None
        if kind == protocol.OUTPUT:
            return body
        if kind == protocol.OUTPUT_TOO_LARGE:
            raise FunctionFailed(
                "function_error", f"output of {body.decode()} bytes is over the node's limit"
            )
        text = body.decode(errors="replace")
        raise FunctionFailed("function_error", "handler raised " + _last_line(text), text)

    def kill(self) -> None:
        self.healthy = False
        kill_group(self._proc)
        self._writer.close()


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    size, kind = protocol.HEADER.unpack(await reader.readexactly(protocol.HEADER.size))
    return kind, await reader.readexactly(size)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "an exception"
