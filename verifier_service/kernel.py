"""The kernel verifier's workers (kernel_worker.py): long-lived processes of reduced privilege, one
verification at a time each, killed and replaced when one overruns its CPU budget or deadline.

The budget is CPU time, read from /proc while the kernel walks: the kernel's 1M-instruction
limit takes it 3-5 s, so a walk is cut off when it has spent what the service's instruction
budget takes (docs/architecture.md §5), not when it returns. CPU time, not wall time, so a
worker slowed by its neighbours is not cut off for their load."""

import asyncio
import os
import sys

import msgspec

from verifier_service.kernel_worker import FRAME, KernelRequest, KernelResult

_results = msgspec.msgpack.Decoder(KernelResult)
BUDGET_POLL_S = 0.02  # the budget is checked this often (the kernel counts CPU in 10 ms ticks)
_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


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

    def cpu_seconds(self) -> float:
        """The worker's CPU time, user and system (a verification is mostly the kernel's)."""
        with open(f"/proc/{self.proc.pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * _TICK_S

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
        self._starting: set[asyncio.Task] = set()  # replacements for workers killed by a cancellation
        self._closed = False

    async def start(self) -> None:
        for _ in range(self._size):
            await self._add()

    async def _add(self) -> None:
        worker = await Worker.start()
        self._all.add(worker)
        self._idle.put_nowait(worker)

    async def verify(self, request: KernelRequest, timeout_s: float, cpu_budget_s: float) -> KernelResult:
        worker = await self._idle.get()
        answer = asyncio.ensure_future(worker.verify(request))
        try:
            async with asyncio.timeout(timeout_s):
                spent = await _within_budget(worker, answer, cpu_budget_s)
            if spent is not None:
                await self._replace(worker, answer)
                message = f"the kernel verifier spent over {cpu_budget_s:g} s of CPU on it and was stopped"
                return KernelResult(accepted=False, error=message, stopped="cpu_budget")
            result = answer.result()
        except TimeoutError:
            await self._replace(worker, answer)
            message = f"the kernel verifier took longer than {timeout_s:g} s"
            return KernelResult(accepted=False, error=message, stopped="timeout")
        except (OSError, asyncio.IncompleteReadError, msgspec.DecodeError) as exc:
            await self._replace(worker, answer)
            error = f"the verifier's worker failed ({exc}): not the program's fault, verify it again"
            return KernelResult(accepted=False, error=error, stopped="worker_failed")
        except asyncio.CancelledError:  # the asker went away mid-walk: the worker's state is unknown
            answer.cancel()
            self._all.discard(worker)
            worker.proc.kill()
            self._starting.add(task := asyncio.create_task(self._after_cancel(worker)))
            task.add_done_callback(self._starting.discard)
            raise
        self._idle.put_nowait(worker)
        return result

    async def _after_cancel(self, worker: Worker) -> None:
        await worker.stop()
        if not self._closed:
            await self._add()

    async def _replace(self, worker: Worker, answer: asyncio.Future) -> None:
        answer.cancel()
        self._all.discard(worker)
        await worker.stop()
        await self._add()

    async def close(self) -> None:
        self._closed = True
        await asyncio.gather(*self._starting, return_exceptions=True)
        for worker in list(self._all):
            await worker.stop()
        self._all.clear()


async def _within_budget(worker: Worker, answer: asyncio.Future, budget_s: float) -> float | None:
    """Wait for the answer; the CPU the worker spent if it went over `budget_s` first."""
    start = worker.cpu_seconds()
    while not answer.done():
        await asyncio.wait({answer}, timeout=BUDGET_POLL_S)
        try:
            spent = worker.cpu_seconds() - start
        except FileNotFoundError:  # it died: its answer (an error) says why
            await asyncio.wait({answer})
            break
        if not answer.done() and spent > budget_s:
            return spent
    return None


async def run_kernel_verifier(request: KernelRequest, timeout_s: float, cpu_budget_s: float) -> KernelResult:
    """One verification in a worker of its own (tests and tools; the service keeps a pool)."""
    pool = KernelPool(1)
    await pool.start()
    try:
        return await pool.verify(request, timeout_s, cpu_budget_s)
    finally:
        await pool.close()
