"""A leased key's loop, against a stand-in for etcd's lease and transaction calls: claimed only
if nobody else holds it, re-registered when its lease is lost, never after its owner revoked it
(a stopping node would register again, dead)."""

import asyncio

import pytest

from fabric.leased import IdTaken, LeasedKey
from fabric.store import Entry


class Leases:
    """etcd's lease calls and create-if-absent, as LeasedKey makes them, for one key."""

    def __init__(self) -> None:
        self.puts: list[int] = []
        self.alive: set[int] = set()
        self.held: Entry | None = None  # the key, as etcd holds it
        self.put_seen = asyncio.Event()
        self._next = 0

    async def _grant(self, ttl_s: int) -> int:
        self._next += 1
        self.alive.add(self._next)
        return self._next

    async def create(self, key: str, value: bytes, lease: int) -> Entry | None:
        if self.held is not None and self.held.lease in self.alive:
            return self.held
        self._write(key, value, lease)
        return None

    async def replace(self, key: str, value: bytes, lease: int, mod_revision: int) -> bool:
        if self.held is None or self.held.mod_revision != mod_revision:
            return False
        self._write(key, value, lease)
        return True

    def _write(self, key: str, value: bytes, lease: int) -> None:
        self.puts.append(lease)
        self.held = Entry(key, value, len(self.puts), lease)
        self.put_seen.set()

    async def _keep_alive_once(self, lease_id: int) -> int:
        return 1 if lease_id in self.alive else 0

    async def _revoke(self, lease_id: int) -> None:
        self.alive.discard(lease_id)


def leased(leases: Leases) -> LeasedKey:
    return LeasedKey(leases, "/hetfaas/nodes/host-1", lambda: b"v", ttl_s=1)  # type: ignore[arg-type]


async def test_a_lost_lease_is_granted_again_and_the_key_written_again() -> None:
    leases = Leases()
    key = leased(leases)
    task = asyncio.create_task(key.run())
    try:
        await asyncio.wait_for(key.claimed(), 1)
        leases.put_seen.clear()
        leases.alive.clear()  # expired while etcd was away
        await asyncio.wait_for(leases.put_seen.wait(), 2)
        assert leases.puts == [1, 2]
    finally:
        task.cancel()


async def test_after_revoke_the_key_is_never_written_again() -> None:
    leases = Leases()
    key = leased(leases)
    task = asyncio.create_task(key.run())
    await asyncio.wait_for(key.claimed(), 1)
    await key.revoke()  # the owner stops; its tasks are cancelled only later
    await asyncio.wait_for(task, 2)  # the loop ends by itself at its next keep-alive
    assert leases.puts == [1] and not leases.alive


async def test_a_key_a_live_owner_holds_is_refused_and_left_alone() -> None:
    leases = Leases()
    leases.alive.add(99)
    leases.held = Entry("/hetfaas/nodes/host-1", b"first", 7, 99)
    key = leased(leases)
    task = asyncio.create_task(key.run())

    with pytest.raises(IdTaken, match="'host-1' is already registered"):
        await asyncio.wait_for(key.claimed(), 1)
    await asyncio.wait_for(task, 1)
    await key.revoke()  # as the failed start's cleanup does
    assert leases.puts == [] and leases.alive == {99}, "the holder's key and lease are untouched"


async def test_our_own_key_under_our_earlier_lease_is_taken_over() -> None:
    """etcd was unreachable for a keep-alive, but the lease lived on: the key is still ours."""
    leases = Leases()
    key = leased(leases)
    key._lease_id = 5  # written under lease 5 before the keep-alive failed
    leases.alive.add(5)
    leases.held = Entry("/hetfaas/nodes/host-1", b"v", 3, 5)
    task = asyncio.create_task(key.run())
    try:
        await asyncio.wait_for(key.claimed(), 1)
        assert leases.held.lease != 5 and leases.puts == [leases.held.lease]
    finally:
        task.cancel()


async def test_a_key_taken_while_we_were_away_stops_us() -> None:
    leases = Leases()
    key = leased(leases)
    taken: list[IdTaken] = []
    key.on_taken = taken.append
    task = asyncio.create_task(key.run())
    await asyncio.wait_for(key.claimed(), 1)
    leases.alive.clear()  # our lease expired while we were cut off ...
    leases.alive.add(99)
    leases.held = Entry("/hetfaas/nodes/host-1", b"other", 9, 99)  # ... and another took the id

    await asyncio.wait_for(task, 3)
    assert len(taken) == 1 and taken[0].holder.lease == 99
