"""A leased key's loop, against a stand-in for etcd's lease calls: re-registered when its lease
is lost, never after its owner revoked it (a stopping node would register again, dead)."""

import asyncio

from fabric.store import LeasedKey


class Leases:
    """etcd's lease calls, as LeasedKey makes them."""

    def __init__(self) -> None:
        self.puts: list[int] = []
        self.alive: set[int] = set()
        self.put_seen = asyncio.Event()
        self._next = 0

    async def _grant(self, ttl_s: int) -> int:
        self._next += 1
        self.alive.add(self._next)
        return self._next

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        self.puts.append(lease)
        self.put_seen.set()
        return len(self.puts)

    async def _keep_alive_once(self, lease_id: int) -> int:
        return 1 if lease_id in self.alive else 0

    async def _revoke(self, lease_id: int) -> None:
        self.alive.discard(lease_id)


async def test_a_lost_lease_is_granted_again_and_the_key_written_again() -> None:
    leases = Leases()
    key = LeasedKey(leases, "/k", lambda: b"v", ttl_s=1)  # type: ignore[arg-type]  # the stand-in
    task = asyncio.create_task(key.run())
    try:
        await asyncio.wait_for(leases.put_seen.wait(), 1)
        leases.put_seen.clear()
        leases.alive.clear()  # expired while etcd was away
        await asyncio.wait_for(leases.put_seen.wait(), 2)
        assert leases.puts == [1, 2]
    finally:
        task.cancel()


async def test_after_revoke_the_key_is_never_written_again() -> None:
    leases = Leases()
    key = LeasedKey(leases, "/k", lambda: b"v", ttl_s=1)  # type: ignore[arg-type]  # the stand-in
    task = asyncio.create_task(key.run())
    await asyncio.wait_for(leases.put_seen.wait(), 1)
    await key.revoke()  # the owner stops; its tasks are cancelled only later
    await asyncio.wait_for(task, 2)  # the loop ends by itself at its next keep-alive
    assert leases.puts == [1] and not leases.alive
