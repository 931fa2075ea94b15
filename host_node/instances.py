"""Warm-instance bookkeeping: idle stacks per function, live counts under caps, keep-alive expiry.

Pure (no asyncio, no processes): instances are opaque values; the caller starts and kills them.
"""

from collections import Counter
from typing import Generic, TypeVar

from schemas.messages import function_of

T = TypeVar("T")


class InstancePool(Generic[T]):
    def __init__(self, max_total: int):
        self.max_total = max_total
        self._idle: dict[str, list[tuple[T, float, float]]] = {}  # key -> [(instance, idle since, expires)]
        self._live: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self._live.values())

    def live(self, key: str) -> int:
        return self._live[key]

    def idle_counts(self) -> dict[str, int]:
        return {key: len(stack) for key, stack in self._idle.items() if stack}

    def take_idle(self, key: str) -> T | None:
        """The most recently used idle instance (its caches are the warmest), or None."""
        stack = self._idle.get(key)
        if not stack:
            return None
        instance, _, _ = stack.pop()
        return instance

    def reserve(self, key: str, max_for_key: int) -> bool:
        """Count a new instance in, if both caps allow it; the caller then starts it."""
        if self._live[key] >= max_for_key or self.total >= self.max_total:
            return False
        self._live[key] += 1
        return True

    def put_idle(self, key: str, instance: T, now: float, keep_alive_s: float) -> None:
        self._idle.setdefault(key, []).append((instance, now, now + keep_alive_s))

    def discard(self, key: str) -> None:
        """An instance of `key` is gone (died, failed to start, or was killed)."""
        self._live[key] -= 1
        if self._live[key] <= 0:
            del self._live[key]

    def expired(self, now: float) -> list[tuple[str, T]]:
        """Remove and return idle instances whose keep-alive has run out."""
        gone: list[tuple[str, T]] = []
        for key, stack in self._idle.items():
            gone.extend((key, inst) for inst, _, expires in stack if now > expires)
            stack[:] = [entry for entry in stack if now <= entry[2]]
        for key, _ in gone:
            self.discard(key)
        return gone

    def evict_lru(self, except_key: str) -> tuple[str, T] | None:
        """Remove the longest-idle instance of another function, to make room under `max_total`."""
        oldest: tuple[float, str] | None = None
        for key, stack in self._idle.items():
            if key != except_key and stack and (oldest is None or stack[0][1] < oldest[0]):
                oldest = (stack[0][1], key)
        if oldest is None:
            return None
        key = oldest[1]
        instance, _, _ = self._idle[key].pop(0)
        self.discard(key)
        return key, instance

    def drain(self, function: str | None = None) -> list[tuple[str, T]]:
        """Remove every idle instance (node shutdown), or those of `function` ("tenant/name",
        whatever their code: it was removed)."""
        keys = [key for key in self._idle if function is None or function_of(key) == function]
        gone = [(key, inst) for key in keys for inst, _, _ in self._idle.pop(key)]
        for key, _ in gone:
            self.discard(key)
        return gone
