"""The nodes' room shared between tenants by weight, when their own limits together exceed it.

Two things, both counted by this replica:

- **Room kept for a tenant's recent use.** A tenant whose own limit is above the nodes' room
  (the operator's choice, or a cluster of one big tenant) could take every slot while another
  tenant was quiet for a moment; that one's next calls then waited until the first's long calls
  ended (4.8 s each in tests/integration/test_contention.py). So the capacity is divided
  max-min fairly by weight between the tenants active in the last PEAK_WINDOW_S, each wanting
  the most it ran at once then (`room`), and a tenant may run at most its allotment (`Room.limit`):
  never less than its weighted share, never more than its own limit, and all of its own limit
  when no other tenant is active.
- **Waiting in lines of their own.** When every fitting node is full, each tenant waits in a
  queue of its own, and room that frees goes to the waiting tenant with the fewest on nodes per
  unit of weight (`hetfaas tenant set --weight`, 1 by default), so one tenant's hundreds of
  waiting calls do not stand ahead of another's. Within a tenant, FIFO.

Pure but for the futures."""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from scheduler.waiting import WaitQueue

PEAK_WINDOW_S = 30.0  # "recent": a tenant quiet for 30-60 s no longer has room kept for it


class RecentPeaks:
    """The most invocations each tenant had admitted at once on this replica lately: over the
    current window and the one before it (so between PEAK_WINDOW_S and twice that). Bounded by
    the tenants active in two windows; a quiet tenant's entry goes at the second roll."""

    def __init__(self, window_s: float = PEAK_WINDOW_S):
        self.window_s = window_s
        self._current: dict[str, int] = {}
        self._previous: dict[str, int] = {}
        self._roll_at = 0.0

    def note(self, tenant: str, admitted: int, now: float) -> None:
        if now >= self._roll_at:
            self._roll(now)
        if admitted > self._current.get(tenant, 0):
            self._current[tenant] = admitted

    def peaks(self, now: float) -> dict[str, int]:
        if now >= self._roll_at:
            self._roll(now)
        merged = dict(self._previous)
        for tenant, peak in self._current.items():
            merged[tenant] = max(peak, merged.get(tenant, 0))
        return merged

    def _roll(self, now: float) -> None:
        # a roll after a long quiet spell forgets both windows
        stale = now - self._roll_at >= self.window_s
        self._previous = {} if stale else self._current
        self._current = {}
        self._roll_at = now + self.window_s


@dataclass(frozen=True)
class Room:
    """The nodes' capacity divided between the recently active tenants, worked out once per
    refresh so that a tenant's limit then costs a dict lookup per invocation. Pure."""

    capacity: int  # cluster-wide
    total_weight: int  # of the active tenants
    allotted: Mapping[str, int]  # per active tenant

    def limit(self, tenant: str, own_limit: int, weight: int) -> int:
        """The most `tenant` may run at once: its own limit, at most what it is allotted (when
        others are active), never less than its weighted share of the capacity (so a tenant
        that grows takes room as it frees, through its line in the capacity queue)."""
        allotted = self.allotted.get(tenant)
        if not self.allotted or (allotted is not None and len(self.allotted) == 1):
            return own_limit  # alone (or the first after a quiet spell): nobody to keep room for
        total_weight = self.total_weight + (weight if allotted is None else 0)
        share = self.capacity * weight // total_weight
        return max(1, min(own_limit, max(share, allotted or 0)))


def room(capacity: int, peaks: Mapping[str, int], weight: Callable[[str], int]) -> Room:
    """Max-min fair allotments by weight (water-filling) of `capacity` to the tenants active
    lately, each wanting its recent peak (cluster-wide): a tenant wanting less than its share
    gets what it wants, the rest share what is left by weight."""
    wants = {tenant: peak for tenant, peak in peaks.items() if peak > 0}
    total_weight = sum(weight(tenant) for tenant in wants)
    allotted: dict[str, int] = {}
    left, weight_left = capacity, total_weight or 1
    for tenant in sorted(wants, key=lambda t: wants[t] / weight(t)):
        fair = left * weight(tenant) // weight_left
        allotted[tenant] = min(wants[tenant], fair)
        left -= allotted[tenant]
        weight_left -= weight(tenant)
    return Room(capacity, total_weight, allotted)


def reason(tenant: str) -> tuple[str, str]:
    return ("capacity", tenant)


def next_tenant(
    waiting: Iterable[str],
    running: Mapping[str, int],
    queued: Callable[[str], int],
    weight: Callable[[str], int],
) -> str | None:
    """Which waiting tenant the next room goes to: the fewest on nodes (running, less those still
    queued) per weight. Ties go to the tenant that began waiting first (`waiting`'s order)."""
    best, best_load = None, 0.0
    for tenant in waiting:
        if not (still := queued(tenant)):
            continue  # every waiter of it woken already: its turns are taken
        load = (running.get(tenant, 0) - still) / weight(tenant)
        if best is None or load < best_load:
            best, best_load = tenant, load
    return best


class CapacityQueue:
    def __init__(self, queue: WaitQueue, running: Mapping[str, int], weight: Callable[[str], int]):
        self._queue = queue
        self._running = running  # admitted invocations per tenant (those waiting here included)
        self._weight = weight
        self._tenants: dict[str, int] = {}  # waiting tenant -> how many of its invocations wait
        self._waiting = 0  # all of them: the fast path asks on every invocation

    def waiting(self) -> int:
        """How many invocations wait for room (woken ones not yet back included)."""
        return self._waiting

    async def wait(self, tenant: str, timeout_s: float, front: bool) -> bool:
        """As `WaitQueue.wait`, in the tenant's own line."""
        self._tenants[tenant] = self._tenants.get(tenant, 0) + 1
        self._waiting += 1
        try:
            return await self._queue.wait(reason(tenant), timeout_s, front, pass_on=self.wake)
        finally:
            self._waiting -= 1
            left = self._tenants[tenant] - 1
            if left:
                self._tenants[tenant] = left
            else:
                del self._tenants[tenant]

    def wake(self) -> None:
        """Room for one more: to the waiting tenant furthest below its weighted share."""
        tenant = next_tenant(self._tenants, self._running, self._queued, self._weight)
        if tenant is not None:
            self._queue.wake(reason(tenant))

    def wake_all(self) -> None:
        """A node's room changed in a way a count cannot say (memory, partitions): all look again."""
        for tenant in list(self._tenants):
            self._queue.wake_all(reason(tenant))

    def _queued(self, tenant: str) -> int:
        return self._queue.waiting(reason(tenant))
