"""The kernel verifier's workers (kernel_worker.py): long-lived processes of reduced privilege, one
verification at a time each, killed and replaced when one overruns its deadline."""

import asyncio
import sys

import msgspec

from verifier_service.kernel_worker import FRAME, KernelRequest, KernelResult

_results = msgspec.msgpack.Decoder(KernelResult)


class Worker:
    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc

    @classmethod
    async def start(cls) -> "Worker":
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "verifier_service.kernel_worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def verify(self, request: KernelRequest) -> KernelResult:
        assert self.proc.stdin and self.proc.stdout
        body = msgspec.msgpack.encode(request)
        self.proc.stdin.write(FRAME.pack(len(body)) + body)
        await self.proc.stdin.drain()
        (size,) = FRAME.unpack(await self.proc.stdout.readexactly(FRAME.size))
        return _results.decode(await self.proc.stdout.readexactly(size))

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


class KernelPool:
    """`size` workers started ahead of need: a verification costs the kernel's time, not a Python
    start-up (about 0.1 s here)."""

    def __init__(self, size: int):
        self._size = size
        self._idle: asyncio.Queue[Worker] = asyncio.Queue()
        self._all: set[Worker] = set()

    async def start(self) -> None:
        for _ in range(self._size):
            await self._add()

    async def _add(self) -> None:
        worker = await Worker.start()
        self._all.add(worker)
        self._idle.put_nowait(worker)

    async def verify(self, request: KernelRequest, timeout_s: float) -> KernelResult:
        worker = await self._idle.get()
        try:
            async with asyncio.timeout(timeout_s):
                result = await worker.verify(request)
        except TimeoutError:
            await self._replace(worker)
            return KernelResult(accepted=False, error=f"the kernel verifier took longer than {timeout_s:g} s")
        except (OSError, asyncio.IncompleteReadError, msgspec.DecodeError) as exc:
            await self._replace(worker)
            return KernelResult(accepted=False, error=f"the verifier worker failed: {exc}")
        self._idle.put_nowait(worker)
        return result

    async def _replace(self, worker: Worker) -> None:
        self._all.discard(worker)
        await worker.stop()
        await self._add()

    async def close(self) -> None:
        for worker in list(self._all):
            await worker.stop()
        self._all.clear()


async def run_kernel_verifier(request: KernelRequest, timeout_s: float) -> KernelResult:
    """One verification in a worker of its own (tests and tools; the service keeps a pool)."""
    pool = KernelPool(1)
    await pool.start()
    try:
        return await pool.verify(request, timeout_s)
    finally:
        await pool.close()
