"""Per-tenant admission for verifications: a token bucket each (rate and burst), and one
verification in flight per tenant, so a burst from one tenant queues behind itself and never
delays another tenant's. Pure accounting; the service awaits the per-tenant turn."""

import asyncio
from collections import defaultdict


class TenantBuckets:
    def __init__(self, rate_per_s: float, burst: int):
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at)

    def take(self, tenant: str, now: float) -> bool:
        tokens, at = self._tokens.get(tenant, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
        if tokens < 1:
            self._tokens[tenant] = (tokens, now)
            return False
        self._tokens[tenant] = (tokens - 1, now)
        return True


class FairTurns:
    """At most `workers` verifications at once, at most one per tenant: a tenant's second request
    waits for its first, so tenants take the workers in turn."""

    def __init__(self, workers: int):
        self._workers = asyncio.Semaphore(workers)
        self._tenants: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def run(self, tenant: str, work):
        lock = self._tenants[tenant]
        async with lock, self._workers:
            return await work()
