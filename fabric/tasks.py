"""Tracked asyncio tasks: every task a service starts is cancelled and awaited when it closes."""

import asyncio
import contextvars
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskSet:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(
        self,
        coro: Coroutine[Any, Any, Any],
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name, context=context)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def spawn_eagerly(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> None:
        """Run `coro` at once up to its first wait, as Python 3.12's eager tasks do (3.11 has
        none): a coroutine that finishes without waiting (a DPU node's warm invocation) costs no
        task, no loop turn before it starts, and no done callback. One that waits goes on in a
        task from there, in the same context of its own."""
        context = contextvars.copy_context()
        try:
            awaited = context.run(coro.send, None)
        except StopIteration:
            return
        except (KeyboardInterrupt, SystemExit):  # as a task would: these are not the coroutine's to keep
            raise
        except BaseException as exc:
            log.error("task %s failed", name or getattr(coro, "__qualname__", "?"), exc_info=exc)
            return
        self.spawn(_resume(coro, awaited), name, context)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self, timeout_s: float) -> None:
        """Let running tasks finish for up to `timeout_s`."""
        if self._tasks and timeout_s > 0:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _resume(coro: Coroutine[Any, Any, Any], awaited: Any) -> Any:
    """Drive `coro`, suspended on `awaited`, to its end as a task's steps would: wait for what it
    waits on, then let it read the outcome itself. Cancelling this task cancels what `coro`
    waits on, or is thrown into `coro` where it waits."""
    while True:
        cancelled: BaseException | None = None
        try:
            if awaited is None:  # a bare yield (asyncio.sleep(0)): one loop turn
                await asyncio.sleep(0)
            elif asyncio.isfuture(awaited):
                awaited._asyncio_future_blocking = False  # taken, as a task takes it
                await awaited
            else:
                cancelled = RuntimeError(f"bad yield from an eagerly started coroutine: {awaited!r}")
        except asyncio.CancelledError as exc:
            if awaited is None or not awaited.cancelled():  # this task was cancelled, not the future
                cancelled = exc
        except BaseException:  # the future's own failure: `coro` reads it there
            pass
        try:
            awaited = coro.send(None) if cancelled is None else coro.throw(cancelled)
        except StopIteration as done:
            return done.value
