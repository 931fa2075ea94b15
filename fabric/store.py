"""The etcd store: typed reads, writes, prefix watches that survive compaction, and leased keys.

Built on etcd3aio (async, retries transient errors). Only this module imports it.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import grpc
from etcd3aio import Etcd3Client, EtcdError, prefix_range_end
from etcd3aio._protobuf import Compare
from etcd3aio.errors import EtcdUnauthenticatedError
from etcd3aio.kv import KVService

from fabric import endpoints as endpoints_module
from fabric.credentials import EtcdLogin

log = logging.getLogger(__name__)
T = TypeVar("T")

RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

# etcd refuses a token issued before any user or role changed (as etcd's own client does, log
# in again): a planned cluster's members assert every service user at each start.
OLD_AUTH_REVISION = "auth: revision in header is old"

# Every way an etcd call can fail when etcd is down or slow; callers treat them as "unavailable".
STORE_ERRORS = (EtcdError, grpc.aio.AioRpcError, asyncio.TimeoutError, OSError)


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0  # the lease the key lives under (0: none, it stays until deleted)


@dataclass(frozen=True)
class Event:
    kind: Literal["put", "delete"]
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0


def split_pem(text: bytes) -> tuple[bytes, bytes]:
    """A PEM file's certificates and its private key, apart (gRPC takes them separately)."""
    certs, key = [], b""
    for block in text.split(b"-----BEGIN ")[1:]:
        block = b"-----BEGIN " + block.strip() + b"\n"
        if b"PRIVATE KEY-----" in block.split(b"\n", 1)[0]:
            key = block
        else:
            certs.append(block)
    return b"".join(certs), key


class Compacted(Exception):
    """The watch's start revision was compacted away: the caller must list again."""


class Store:
    """`login`: the etcd user this process is (a cluster with auth on refuses anonymous calls);
    `ca`: PEM of the CA that signed etcd's certificate, to reach it over TLS; `client_cert`: PEM
    of a certificate and its key, for an etcd that admits only clients with one (a planned
    cluster's); `server_name`: the name etcd's certificates are checked against when the
    endpoints are addresses (gRPC cannot take one name from a list of them)."""

    def __init__(
        self,
        endpoints: list[str],
        timeout_s: float = 5.0,
        login: EtcdLogin | None = None,
        ca: bytes = b"",
        client_cert: bytes = b"",
        server_name: str = "",
    ):
        found = endpoints_module.targets(endpoints)
        if found.wants_tls and not ca:
            raise endpoints_module.BadEndpoint(
                "https:// etcd endpoints need etcd_ca, the CA that signed etcd's certificate"
            )
        cert_chain, cert_key = split_pem(client_cert)
        # Six attempts back off 50 ms doubling to 1.55 s in all: long enough to ride out the
        # channel's reconnect (capped at 1 s below), short of the 5 s per-call timeout.
        self._client = Etcd3Client(
            found.addresses,
            rpc_max_attempts=6,
            ca_cert=ca or None,
            tls_server_name=(server_name or found.server_name) if ca else None,
            cert_chain=cert_chain or None,
            cert_key=cert_key or None,
        )
        self._login = login
        self._token = ""  # the etcd token calls carry ("": none yet)
        self._login_lock = asyncio.Lock()
        # gRPC backs off reconnects up to 120 s by default: after an etcd outage the store would
        # stay "unavailable" long after etcd is back. Cap it (etcd3aio builds the channel from
        # these options; it has no parameter for them).
        self._client._manager.grpc_options.extend(RECONNECT_OPTIONS)
        self.timeout_s = timeout_s

    async def __aenter__(self) -> "Store":
        await self._client.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._client.close()

    @property
    def _kv(self) -> KVService:
        assert self._client.kv is not None, "store not connected"
        return self._client.kv

    async def _authenticated(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call` under this process's etcd token, logging in first when it has none. A token
        etcd no longer knows (etcd restarted: its simple tokens live in memory; or idle past
        their TTL) gets one new login and one retry."""
        if self._login is None:
            return await call()
        if not self._token:
            await self._log_in(stale="")
        token = self._token
        try:
            return await call()
        except EtcdUnauthenticatedError:
            await self._log_in(stale=token)
            return await call()
        except grpc.aio.AioRpcError as exc:
            if OLD_AUTH_REVISION not in (exc.details() or ""):
                raise
            await self._log_in(stale=token)  # users or roles changed since the token was issued
            return await call()

    async def _log_in(self, stale: str) -> None:
        """A new token, unless another call got one since `stale` failed (or was missing)."""
        assert self._login is not None and self._client.auth is not None, "store not connected"
        async with self._login_lock:
            if self._token != stale:
                return  # another call logged in while this one waited
            try:
                resp = await self._client.auth.authenticate(
                    self._login.user, self._login.password, timeout=self.timeout_s
                )
            except grpc.aio.AioRpcError as exc:  # etcd answers a bad login INVALID_ARGUMENT
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                message = (exc.details() or "").removeprefix("etcdserver: ")
                raise EtcdUnauthenticatedError(
                    f"etcd refused the login of {self._login.user}: {message}"
                ) from None
            self._client.set_token(resp.token)
            self._token = resp.token

    async def get(self, key: str) -> Entry | None:
        resp = await self._authenticated(lambda: self._kv.get(key, timeout=self.timeout_s))
        if not resp.kvs:
            return None
        kv = resp.kvs[0]
        return Entry(kv.key.decode(), kv.value, kv.mod_revision, kv.lease)

    async def list_prefix(self, prefix: str) -> tuple[list[Entry], int]:
        """All entries under `prefix` and the store revision they were read at."""
        resp = await self._authenticated(
            lambda: self._kv.get(prefix, prefix_range_end(prefix), timeout=self.timeout_s)
        )
        entries = [Entry(kv.key.decode(), kv.value, kv.mod_revision, kv.lease) for kv in resp.kvs]
        return entries, resp.header.revision

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        resp = await self._authenticated(
            lambda: self._kv.put(key, value, lease=lease, timeout=self.timeout_s)
        )
        return resp.header.revision

    async def create(self, key: str, value: bytes, lease: int) -> Entry | None:
        """Write `key` only if it does not exist, atomically; else nothing is written and the
        entry that exists is returned."""
        kv = self._kv
        resp = await self._authenticated(
            lambda: kv.txn(
                [KVService.txn_compare_create_revision(key, 0)],
                [KVService.txn_op_put(key, value, lease=lease)],
                [KVService.txn_op_get(key)],
                timeout=self.timeout_s,
            )
        )
        if resp.succeeded:
            return None
        found = resp.responses[0].response_range.kvs[0]
        return Entry(found.key.decode(), found.value, found.mod_revision, found.lease)

    async def replace(self, key: str, value: bytes, lease: int, mod_revision: int) -> bool:
        """Write `key` only if it is still as read at `mod_revision`, atomically."""
        kv = self._kv
        unchanged = Compare(
            result=Compare.EQUAL, target=Compare.MOD, key=key.encode(), mod_revision=mod_revision
        )
        resp = await self._authenticated(
            lambda: kv.txn(
                [unchanged], [KVService.txn_op_put(key, value, lease=lease)], timeout=self.timeout_s
            )
        )
        return bool(resp.succeeded)

    async def delete(self, key: str) -> bool:
        resp = await self._authenticated(lambda: self._kv.delete(key, timeout=self.timeout_s))
        return resp.deleted > 0

    async def watch_prefix(
        self, prefix: str, start_revision: int, on_created: Callable[[], None] | None = None
    ) -> AsyncIterator[list[Event]]:
        """Batches of events after `start_revision`; raises Compacted when history is gone.
        `on_created` runs once etcd has set the watch up: from then on no event is missed."""
        assert self._client.watch is not None, "store not connected"
        if self._login is not None and not self._token:
            await self._log_in(stale="")  # a stale token fails the stream; the caller lists again
        stream = self._client.watch.watch(prefix, prefix_range_end(prefix), start_revision=start_revision)
        async for response in stream:
            if response.compact_revision > 0 or response.canceled:
                raise Compacted(f"watch on {prefix} lost history at revision {response.compact_revision}")
            if response.created and on_created is not None:
                on_created()
            events = [
                Event(
                    "put" if ev.type == 0 else "delete",
                    ev.kv.key.decode(),
                    ev.kv.value,
                    ev.kv.mod_revision,
                    ev.kv.lease,
                )
                for ev in response.events
            ]
            if events:
                yield events
        raise Compacted(f"watch on {prefix} ended")

    async def _grant(self, ttl_s: int) -> int:
        lease = self._client.lease
        assert lease is not None, "store not connected"
        return (await self._authenticated(lambda: lease.grant(ttl_s, timeout=self.timeout_s))).ID

    async def _keep_alive_once(self, lease_id: int) -> int:
        """One keep-alive round trip; returns the remaining TTL (0 or less: the lease is gone)."""
        assert self._client.lease is not None, "store not connected"
        call = self._client.lease.keep_alive(lease_id)
        try:
            async with asyncio.timeout(self.timeout_s):
                async for response in call:
                    return response.TTL
        finally:
            call.cancel()
        return 0

    async def _revoke(self, lease_id: int) -> None:
        lease = self._client.lease
        assert lease is not None, "store not connected"
        await self._authenticated(lambda: lease.revoke(lease_id, timeout=self.timeout_s))


async def follow_prefix(
    store: Store,
    prefix: str,
    reset: Callable[[list[Entry]], None],
    apply: Callable[[Event], None],
    synced: asyncio.Event,
    lost: Callable[[], None] | None = None,
) -> None:
    """Keep a local copy of `prefix` in step with etcd: list, then watch from the listed revision;
    list again when the watch loses history (compaction) or etcd comes back after an outage.
    `synced` is set while a watch is set up (from then on no change is missed) and cleared when
    etcd is lost, when `lost` is called too."""
    retry_s = 0.2
    while True:
        try:
            entries, revision = await store.list_prefix(prefix)
            reset(entries)
            retry_s = 0.2
            # Synced only once the watch is set up: a listing alone can miss what changes
            # right after it, should etcd fail before the watch starts.
            async for batch in store.watch_prefix(prefix, revision + 1, on_created=synced.set):
                for event in batch:
                    apply(event)
        except Compacted as exc:
            log.info("re-listing %s: %s", prefix, exc)
        except Exception as exc:  # etcd down (or worse): keep serving the last copy, retry
            if synced.is_set():
                log.warning(
                    "etcd unavailable while following %s (%s); serving from the last view", prefix, exc
                )
                synced.clear()
                if lost is not None:
                    lost()
            await asyncio.sleep(retry_s)
            retry_s = min(retry_s * 2, 2.0)
