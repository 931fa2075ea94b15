"""The node's stock of python stem cells (runtimes/python_stem.py): kept at its target, one
started at a time, each when the node is quiet (quiet.py)."""

import asyncio
import logging
from collections import deque

from host_node.quiet import Quiet
from host_node.runtimes.errors import FunctionFailed
from host_node.runtimes.python_stem import StemCell
from host_node.sandbox.cgroups import Limits
from host_node.spawner import Spawner

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
MAX_BACKOFF_S = 10.0


class StemCells:
    def __init__(self, spawner: Spawner, limits: Limits, target: int, quiet: Quiet | None = None):
        self._spawner = spawner
        self._quiet = quiet or Quiet()  # starts wait while the node runs invocations
        self._limits = limits  # the idle size class: the function's own are set when one is taken
        self.target = target
        self._idle: deque[StemCell] = deque()
        self._wanted = asyncio.Event()  # one was taken, or found dead: refill
        self._full = asyncio.Event()  # the stock is at its target
        self.started = 0  # ever, for tests and `hetfaas status`
        self.failures = 0  # in a row

    @property
    def ready(self) -> int:
        return len(self._idle)

    def take(self) -> StemCell | None:
        """An idle stem cell, or None (the start goes the fresh way); a refill is asked for."""
        while self._idle:
            stem = self._idle.popleft()
            self._wanted.set()
            self._full.clear()
            if stem.alive:
                return stem
            stem.kill()
        return None

    async def keep_stocked(self) -> None:
        """Run for the node's life (a tracked task): start stem cells up to the target."""
        while True:
            while len(self._idle) < self.target:
                await self._quiet.wait()
                try:
                    stem = await StemCell.start(self._spawner, self._limits, START_TIMEOUT_S)
                except (FunctionFailed, OSError, TimeoutError) as exc:
                    self.failures += 1
                    delay = min(MAX_BACKOFF_S, 0.1 * 2**self.failures)
                    if self.failures <= 3 or self.failures % 100 == 0:
                        log.error(
                            "starting a stem cell failed (failure %d; next in %.1fs): %s",
                            self.failures,
                            delay,
                            exc,
                        )
                    await asyncio.sleep(delay)  # a back-off, not a wait for an event
                    continue
                self.failures = 0
                self.started += 1
                self._idle.append(stem)
            self._full.set()
            self._wanted.clear()
            await self._wanted.wait()

    async def stocked(self) -> None:
        """Until the stock is at its target (a benchmark's bursts start from a full stock)."""
        await self._full.wait()

    def restock(self, target: int) -> None:
        """A new target: more are started, or those past it stopped."""
        self.target = target
        while len(self._idle) > target:
            self._idle.popleft().kill()
        self._full.clear()
        self._wanted.set()

    def close(self) -> None:
        while self._idle:
            self._idle.popleft().kill()
