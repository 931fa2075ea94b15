"""Deadlines by the thousand: one loop timer per time slot instead of one per deadline.

uvloop arms each timer as a libuv handle of its own: `call_at` and `cancel` cost ~2.5 µs of CPU
here, and a request that is answered in time (nearly all) pays both. A deadline here is a set
insertion into the slot it falls in (GRANULARITY_S wide); the slot's timer fires every key in
it that is still there, at most one slot late.
"""

import asyncio
import logging
import math
import weakref
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger(__name__)
GRANULARITY_S = 0.005


class Deadlines:
    """Keys due at loop times; `fire(key)` is called for each key still due when its slot ends."""

    def __init__(self, fire: Callable[[Hashable], None], granularity_s: float = GRANULARITY_S):
        self._fire = fire
        self._granularity_s = granularity_s
        self._slots: dict[int, set[Hashable]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, at: float, key: Hashable) -> int:
        """`key` is due at loop time `at`; returns its slot, for `discard`."""
        slot = math.ceil(at / self._granularity_s)
        keys = self._slots.get(slot)
        if keys is None:
            keys = self._slots[slot] = set()
            loop.call_at(slot * self._granularity_s, self._due, slot)
        keys.add(key)
        return slot

    def discard(self, slot: int, key: Hashable) -> None:
        keys = self._slots.get(slot)
        if keys is not None:
            keys.discard(key)

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._slots.values())

    def _due(self, slot: int) -> None:
        for key in self._slots.pop(slot, ()):
            try:
                self._fire(key)
            except Exception:  # one key's failure must not leave the rest of its slot unfired
                log.exception("a deadline's callback failed")


_per_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Callable[[Any], None], Deadlines]]" = (
    weakref.WeakKeyDictionary()
)


def of_loop(loop: asyncio.AbstractEventLoop, fire: Callable[[Any], None]) -> Deadlines:
    """The loop's Deadlines calling `fire` (a module-level function): one per loop and callback,
    since a slot's timer belongs to the loop that armed it."""
    by_fire = _per_loop.get(loop)
    if by_fire is None:
        by_fire = _per_loop[loop] = {}
    deadlines = by_fire.get(fire)
    if deadlines is None:
        deadlines = by_fire[fire] = Deadlines(fire)
    return deadlines


def timeouts(loop: asyncio.AbstractEventLoop) -> Deadlines:
    """The loop's Deadlines for futures: one still pending when it is due gets TimeoutError."""
    return of_loop(loop, _time_out)


def _time_out(future: "asyncio.Future[Any]") -> None:
    if not future.done():
        future.set_exception(TimeoutError())
