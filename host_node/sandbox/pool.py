"""Pool accounting and the refill decision for one shard. Pure: no cgroup is touched here.

The shard's spawner asks `RefillPlanner.plan` what to build on each loop turn; the planner holds
back during a burst (a launch less than `idle_ms` ago), refills up to the target once the burst is
over, and never builds faster than `max_per_s` (token bucket), so refilling cannot take the CPU a
following burst needs."""

from collections import deque

import msgspec


class PoolSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    low_water: int = 8  # refill when fewer free slots (or prewarmed sandboxes) than this
    target: int = 16  # and build up to this many
    idle_ms: float = 50.0  # "after a burst": no launch for this long
    max_per_s: float = 200.0  # refill rate limit per shard
    max_dying: int = 256  # pause removals while the kernel is tearing down this many of our cgroups


class RefillPlanner:
    def __init__(self, settings: PoolSettings, now: float):
        self.settings = settings
        self._tokens = float(settings.target)
        self._stamp = now
        self._last_demand = -1e9
        self._cycle = False  # a refill is under way (it continues past the low-water mark)
        self.refilling = False  # ... and is not paused by a burst

    def demand(self, now: float) -> None:
        """A launch arrived: a burst is (still) on."""
        self._last_demand = now

    def plan(self, have: int, now: float) -> int:
        """How many to build now, given `have` ready (free, being built included)."""
        settings = self.settings
        self._tokens = min(float(settings.target), self._tokens + (now - self._stamp) * settings.max_per_s)
        self._stamp = now
        in_burst = now - self._last_demand < settings.idle_ms / 1000
        if in_burst or (not self._cycle and have >= settings.low_water):
            self.refilling = False  # paused by the burst, or nothing to do
            return 0
        want = max(0, settings.target - have)
        self._cycle = self.refilling = want > 0  # once started, a cycle fills up to the target
        count = min(want, int(self._tokens))
        self._tokens -= count
        return count

    @property
    def in_cycle(self) -> bool:
        return self._cycle

    def next_check_s(self, now: float) -> float:
        """How long the spawner may sleep before `plan` could say something new."""
        quiet_at = self._last_demand + self.settings.idle_ms / 1000
        token_at = self._stamp + max(0.0, 1 - self._tokens) / self.settings.max_per_s
        return max(0.0, max(quiet_at, token_at) - now)


class Backoff:
    """Refill work that keeps failing (a broken host, a bad setting) waits longer each time, so a
    shard never spins on it: 0.1 s after the first failure, doubling up to `max_s`."""

    def __init__(self, max_s: float = 30.0):
        self.max_s = max_s
        self.failures = 0
        self._until = 0.0

    def failed(self, now: float) -> float:
        self.failures += 1
        delay = min(self.max_s, 0.1 * 2 ** (self.failures - 1))
        self._until = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self._until = 0.0

    def ready(self, now: float) -> bool:
        return now >= self._until

    def wait_s(self, now: float) -> float:
        return max(0.0, self._until - now)


class SlotPool:
    """Free slot names, first-in first-out (a slot rests as long as possible before reuse)."""

    def __init__(self, shard: int):
        self.shard = shard
        self.free: deque[str] = deque()
        self.busy: set[str] = set()
        self._seq = 0
        self.created = 0
        self.recycled = 0
        self.vanished = 0
        self.inline = 0
        self.released = 0  # slots handed back after a launch ran in them

    def new_name(self, naive: bool = False) -> str:
        self._seq += 1
        return f"{'n' if naive else 's'}{self.shard}-{self._seq}"

    def adopt(self, name: str) -> None:
        """Take a leftover slot of this shard (after a crash) as free, and never reuse its name."""
        number = name.split("-", 1)[-1]
        if number.isdigit():
            self._seq = max(self._seq, int(number))
        self.free.append(name)

    def take(self) -> str | None:
        if not self.free:
            return None
        name = self.free.popleft()
        self.busy.add(name)
        return name

    def add_free(self, name: str, recycled: bool) -> None:
        self.busy.discard(name)
        self.free.append(name)
        if recycled:
            self.recycled += 1
        else:
            self.created += 1

    def mark_busy(self, name: str, inline: bool) -> None:
        self.busy.add(name)
        if inline:
            self.inline += 1
            self.created += 1

    def drop(self, name: str, vanished: bool) -> None:
        self.busy.discard(name)
        if vanished:
            self.vanished += 1


def choose_shard(ready: list[int], home: int, mode: str) -> tuple[int, bool]:
    """The shard for a launch and whether it is borrowed: the home shard if it has a slot (or a
    prewarmed sandbox) ready, else the neighbour with the most, else home (it creates one inline)."""
    if mode == "naive" or ready[home] > 0:
        return home, False
    best = max(range(len(ready)), key=lambda i: (ready[i], -((i - home) % len(ready))))
    if ready[best] > 0:
        return best, True
    return home, False
