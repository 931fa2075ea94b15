"""Background starts (stem cells, templates) wait for a quiet node: each is an interpreter
starting, ~40 ms of a CPU, which running invocations would otherwise share (2 CPUs here). So a
start waits until nothing runs on the node, or, on a node that is never idle, at most
MAX_WAIT_S: a busy node still restocks, at one start a second."""

import asyncio
from collections.abc import Callable

MAX_WAIT_S = 1.0


class Quiet:
    """Whether the node runs invocations (`busy`), and a wake-up for who waits for it not to:
    the node calls `idle()` when its last invocation ends (cheap when nobody waits)."""

    def __init__(self, busy: Callable[[], bool] = lambda: False):
        self.busy = busy
        self._woken: asyncio.Event | None = None  # only while a start waits

    def idle(self) -> None:
        if self._woken is not None:
            self._woken.set()

    async def wait(self, max_wait_s: float = MAX_WAIT_S) -> None:
        """Until the node is quiet, or `max_wait_s` has passed."""
        if not self.busy():
            return
        woken = self._woken = self._woken or asyncio.Event()
        try:
            async with asyncio.timeout(max_wait_s):
                while self.busy():
                    woken.clear()
                    await woken.wait()
        except TimeoutError:
            pass  # busy all along: start anyway, one a second
        finally:
            self._woken = None
