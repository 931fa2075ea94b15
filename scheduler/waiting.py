"""The admission queue: invocations waiting for a limit or for node capacity, bounded in length
and in time. A freed slot wakes the longest waiter for that slot (FIFO per reason)."""

import asyncio
from collections import defaultdict, deque
from collections.abc import Callable, Hashable


class QueueFull(Exception):
    pass


class WaitQueue:
    def __init__(self, max_len: int):
        self.max_len = max_len
        self._waiters: defaultdict[Hashable, deque[asyncio.Future[None]]] = defaultdict(deque)
        self.length = 0

    def waiting(self, reason: Hashable) -> int:
        queue = self._waiters.get(reason)
        return len(queue) if queue else 0

    async def wait(
        self,
        reason: Hashable,
        timeout_s: float,
        front: bool = False,
        pass_on: Callable[[], None] | None = None,
    ) -> bool:
        """Wait until woken for `reason` (True) or `timeout_s` passes (False). Raises QueueFull
        when `max_len` invocations wait already: they are turned away at once, not queued.
        `front`: a waiter that was woken but lost the slot keeps its turn. `pass_on`: who gets
        the turn of one woken just as its time ran out (the next waiting for `reason` if None)."""
        if self.length >= self.max_len:
            raise QueueFull(f"{self.length} invocations are queued on this replica, its limit")
        if timeout_s <= 0:
            return False
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiters[reason]
        if front:
            queue.appendleft(future)
        else:
            queue.append(future)
        self.length += 1
        try:
            async with asyncio.timeout(timeout_s):
                await future
            return True
        except TimeoutError:
            if future.done() and not future.cancelled():
                # woken as the time ran out: pass the turn on, do not lose it
                if pass_on is not None:
                    pass_on()
                else:
                    self.wake(reason)
            return False
        finally:
            self.length -= 1
            if future in queue:
                queue.remove(future)
            # Drop the deque only if it is still the one for `reason`: a waiter woken from an
            # older one must not take newer waiters' deque with it (they would never be woken).
            if not queue and self._waiters.get(reason) is queue:
                del self._waiters[reason]

    def wake(self, reason: Hashable, count: int = 1) -> None:
        queue = self._waiters.get(reason)
        while queue and count > 0:
            future = queue.popleft()
            if not future.done():
                future.set_result(None)
                count -= 1

    def wake_all(self, reason: Hashable) -> None:
        self.wake(reason, self.length)
