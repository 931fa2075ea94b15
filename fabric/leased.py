"""A key that exists while its owner lives, and only one owner at a time: a service's registration.

The key is claimed atomically (etcd: create if absent, under a fresh lease), kept alive, and
claimed again if its lease is lost (etcd away longer than the TTL). A key held by a live owner
under another lease is never overwritten: a second node started with the same id is refused
(`IdTaken`), instead of both serving and every invocation running twice.
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable

from fabric.fatal import Fatal
from fabric.store import STORE_ERRORS, Entry, Store

log = logging.getLogger(__name__)


class IdTaken(Fatal):
    def __init__(self, key: str, holder: Entry):
        self.key, self.holder = key, holder
        name = key.rstrip("/").rsplit("/", 1)[-1]
        super().__init__(
            f"{name!r} is already registered ({key}, held by a live process under lease {holder.lease:x}): "
            "stop that one, or give this one another id"
        )


class LeasedKey:
    """`run()` claims the key and keeps it; `claimed()` waits for the first claim (and raises
    IdTaken if another owner holds it). `on_taken` is called if the key is found taken on a later
    claim (another owner registered it while this one was cut off from etcd): by then both may
    be serving, and the caller should stop."""

    def __init__(self, store: Store, key: str, value: Callable[[], bytes], ttl_s: int):
        self._store = store
        self._key = key
        self._value = value
        self._ttl_s = ttl_s
        self._lease_id = 0  # the lease the key is (or was last) written under by us
        self._revoked = False
        self.held = False  # claimed and kept alive now (False while etcd is away, until claimed again)
        self._first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.on_taken: Callable[[IdTaken], None] = lambda exc: log.error("%s", exc)

    async def claimed(self) -> None:
        await asyncio.shield(self._first)

    async def run(self) -> None:
        retry_s = 0.2
        # Not after `revoke`: the owner is stopping, and its tasks are cancelled only after its
        # registration is revoked, so the keep-alive would otherwise see the lease gone and write
        # the key again, a dead node registered for another TTL.
        while not self._revoked:
            try:
                await self._claim()
                self.held = True
                if not self._first.done():
                    self._first.set_result(None)
                retry_s = 0.2
                await self._keep_alive()
                self.held = False
            except IdTaken as exc:
                self.held = False
                if not self._first.done():
                    self._first.set_exception(exc)
                else:
                    self.on_taken(exc)
                return
            except Exception as exc:  # etcd down, or anything else: the key must come back
                self.held = False
                log.warning("lease for %s: %s; retrying in %.1fs", self._key, exc, retry_s)
            await asyncio.sleep(retry_s)
            retry_s = min(retry_s * 2, self._ttl_s / 2)

    async def _claim(self) -> None:
        """Write the key under a new lease if nobody holds it. Held under our own earlier lease
        (the keep-alive failed but the lease lived on), it is ours: taken over. Else IdTaken."""
        store = self._store
        lease = await store._grant(self._ttl_s)
        try:
            held = await store.create(self._key, self._value(), lease)
            if held is not None:
                ours = self._lease_id != 0 and held.lease == self._lease_id
                if not (ours and await store.replace(self._key, self._value(), lease, held.mod_revision)):
                    raise IdTaken(self._key, held)
        except BaseException:
            with contextlib.suppress(*STORE_ERRORS):
                await store._revoke(lease)  # never the holder's: only the one granted here
            raise
        self._lease_id = lease

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_s / 3)
            if await self._store._keep_alive_once(self._lease_id) <= 0:
                if not self._revoked:
                    log.warning("lease for %s expired; registering again", self._key)
                return

    async def revoke(self) -> None:
        """Delete the key now (graceful shutdown) instead of waiting for the TTL; never again."""
        self._revoked = True
        if not self._first.done():
            self._first.cancel()
        if self._lease_id:
            try:
                await self._store._revoke(self._lease_id)
            except STORE_ERRORS as exc:
                log.warning("could not revoke lease for %s: %s", self._key, exc)
