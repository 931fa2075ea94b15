"""Acquiring a warm instance: reuse an idle one, start one if the caps allow, else wait for one."""

import asyncio
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

from fabric.deadlines import timeouts
from host_node.instances import InstancePool
from host_node.runtimes.errors import FunctionFailed


class Instance(Protocol):
    @property
    def healthy(self) -> bool: ...

    def kill(self) -> None: ...


T = TypeVar("T", bound=Instance)


class WarmInstances(Generic[T]):
    def __init__(self, max_total: int):
        self.pool: InstancePool[T] = InstancePool(max_total)
        # Requests waiting for an instance of a function; a released instance goes to the first.
        self._waiters: dict[str, deque[asyncio.Future[T | None]]] = defaultdict(deque)

    async def acquire(
        self, key: str, max_for_key: int, start: Callable[[], Awaitable[T]], timeout_s: float
    ) -> tuple[T, bool]:
        """An instance for `key` and whether it was started for this call (a cold start)."""
        deadline = time.monotonic() + timeout_s
        while True:
            instance = self.take_idle(key)
            if instance is not None:
                return instance, False
            if self._reserve(key, max_for_key):
                try:
                    return await start(), True
                except BaseException:
                    self.pool.discard(key)
                    self._wake(key, None)
                    raise
            instance = await self._wait(key, deadline, max_for_key)
            if instance is not None:
                return instance, False

    def take_idle(self, key: str) -> T | None:
        """An idle instance fit to serve; one that died or was cut off while idle is stopped and
        its place freed, so the call starts a fresh one instead of failing on it."""
        while (instance := self.pool.take_idle(key)) is not None:
            if instance.healthy:
                return instance
            instance.kill()
            self.pool.discard(key)
        return None

    def _reserve(self, key: str, max_for_key: int) -> bool:
        if self.pool.reserve(key, max_for_key):
            return True
        if self.pool.live(key) < max_for_key:
            evicted = self.pool.evict_lru(except_key=key)  # full node: make room from another function
            if evicted is not None:
                evicted[1].kill()
                return self.pool.reserve(key, max_for_key)
        return False

    async def _wait(self, key: str, deadline: float, max_for_key: int) -> T | None:
        future: asyncio.Future[T | None] = asyncio.get_running_loop().create_future()
        self._waiters[key].append(future)
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                return await future
        except TimeoutError:
            raise FunctionFailed(
                "timeout", f"all {max_for_key} instances of the function stayed busy until the deadline"
            ) from None
        finally:
            self._leave_line(key, future)

    def queue(
        self, key: str, wait_s: float, on_ready: Callable[[T | TimeoutError | None], None]
    ) -> "asyncio.Future[T | None]":
        """A place in line for the next instance of `key` released, as `acquire` waits for one
        but with no coroutine: `on_ready` gets the instance, or None (one stopped: there is
        room to start another), or TimeoutError after `wait_s`. Cancel the future returned to
        leave the line."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T | None] = loop.create_future()
        self._waiters[key].append(future)
        deadlines = timeouts(loop)
        slot = deadlines.add(loop, loop.time() + max(wait_s, 0), future)

        def ready(done: "asyncio.Future[T | None]") -> None:
            deadlines.discard(slot, done)
            if done.cancelled():
                self._leave_line(key, done)
            elif isinstance(exc := done.exception(), TimeoutError):
                self._leave_line(key, done)
                on_ready(exc)
            else:
                on_ready(done.result())

        future.add_done_callback(ready)
        return future

    def _leave_line(self, key: str, future: "asyncio.Future[T | None]") -> None:
        waiters = self._waiters.get(key)
        if waiters is not None and future in waiters:
            waiters.remove(future)

    def release(self, key: str, instance: T, keep_alive_s: float, unload: bool = False) -> bool:
        """Hand the instance to a waiter, or keep it idle for `keep_alive_s`; with `unload` (the
        scheduler expects no call for a while) stop it instead. True: it is idle now."""
        if not instance.healthy or (unload and not self._waiters.get(key)):
            instance.kill()
            self.pool.discard(key)
            self._wake(key, None)  # a waiter may now start a fresh instance
            return False
        if self._wake(key, instance):
            return False
        self.pool.put_idle(key, instance, time.monotonic(), keep_alive_s)
        return True

    async def prewarm(
        self, key: str, max_for_key: int, start: Callable[[], Awaitable[T]], keep_alive_s: float
    ) -> bool:
        """Start an idle instance ahead of an expected invocation, unless one is idle already or
        the caps say no. True: one was started."""
        if self.pool.idle_counts().get(key) or not self._reserve(key, max_for_key):
            return False
        try:
            instance = await start()
        except BaseException:
            self.pool.discard(key)
            self._wake(key, None)
            raise
        self.release(key, instance, keep_alive_s)
        return True

    def _wake(self, key: str, instance: T | None) -> bool:
        waiters = self._waiters.get(key)
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(instance)
                return True
        return False

    def reap(self) -> int:
        expired = self.pool.expired(time.monotonic())
        for _, instance in expired:
            instance.kill()
        return len(expired)

    def stop_idle(self, function: str | None = None) -> int:
        """Stop the idle instances: all of them, or those of `function` ("tenant/name")."""
        gone = self.pool.drain(function)
        for _, instance in gone:
            instance.kill()
        return len(gone)

    def close(self) -> None:
        self.stop_idle()
