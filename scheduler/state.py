"""etcd side of the scheduler: follow nodes and functions into the view, read and write records."""

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TypeVar

import msgspec

from fabric import bundles
from fabric.leased import LeasedKey
from fabric.store import STORE_ERRORS, Entry, Event, Store, follow_prefix
from scheduler.view import ClusterView
from schemas import codec, keys, version
from schemas.ebpf import RevokeRequest
from schemas.manifest import spec_problems
from schemas.messages import ApprovedProgram, FunctionRecord, NodeRecord, SchedulerRecord, TenantRecord

log = logging.getLogger(__name__)
R = TypeVar("R")

ETCD_PROBE_S = 0.5
ETCD_PROBE_TIMEOUT_S = 1.0
ETCD_SILENT_S = 2.0  # no answer for this long: etcd is lost to this replica


class ClusterSync:
    """Keeps a ClusterView in step with etcd: list, then watch from the listed revision, and list
    again when the watch loses history (compaction) or etcd comes back after an outage."""

    def __init__(self, store: Store, view: ClusterView, on_node_gone: Callable[[str], None]):
        self._store = store
        self._view = view
        self._on_node_gone = on_node_gone
        self.nodes_synced = asyncio.Event()
        self.functions_synced = asyncio.Event()
        self.tenants_synced = asyncio.Event()
        self.tenants: dict[str, TenantRecord] = {}
        self.schedulers_synced = asyncio.Event()
        self.schedulers: set[str] = set()  # replicas registered (leased) in etcd
        self._lost_at: float | None = None
        self._answered_at = time.monotonic()  # when etcd last answered a probe

    def lost_for(self, now: float) -> float | None:
        """Seconds since etcd was lost, or None while the watches are live and etcd answers its
        probes. The probes tell a cut link within ETCD_SILENT_S: a watch's stream, silent
        anyway while nothing changes, notices only at gRPC's keepalive (10 s + 5 s)."""
        if self.nodes_synced.is_set() and self.functions_synced.is_set():
            self._lost_at = None
        if now - self._answered_at >= ETCD_SILENT_S:
            since = self._answered_at if self._lost_at is None else min(self._lost_at, self._answered_at)
            return now - since
        return None if self._lost_at is None else now - self._lost_at

    async def probe_etcd(self, key: str) -> None:
        """Read `key` (one this replica may read) every ETCD_PROBE_S: is etcd there?"""
        while True:
            try:
                await asyncio.wait_for(self._store.get(key), ETCD_PROBE_TIMEOUT_S)
                self._answered_at = time.monotonic()
            except (*STORE_ERRORS, TimeoutError):
                pass
            await asyncio.sleep(ETCD_PROBE_S)

    def _lost(self) -> None:
        if self._lost_at is None:
            self._lost_at = time.monotonic()

    async def follow_nodes(self) -> None:
        await self._follow(keys.NODES, self._reset_nodes, self._apply_node, self.nodes_synced)

    async def follow_functions(self) -> None:
        await self._follow(keys.FUNCTIONS, self._reset_functions, self._apply_function, self.functions_synced)

    async def follow_tenants(self) -> None:
        await self._follow(keys.TENANTS, self._reset_tenants, self._apply_tenant, self.tenants_synced)

    async def follow_cordons(self) -> None:
        """Drained nodes (`hetfaas node drain`): a key's presence is the cordon."""
        await self._follow(keys.CORDONS, self._reset_cordons, self._apply_cordon, asyncio.Event())

    def _reset_cordons(self, entries: list[Entry]) -> None:
        self._view.set_cordoned(frozenset(e.key.removeprefix(keys.CORDONS) for e in entries))

    def _apply_cordon(self, event: Event) -> None:
        node_id = event.key.removeprefix(keys.CORDONS)
        cordoned = set(self._view.cordoned)
        if event.kind == "delete":
            cordoned.discard(node_id)
        else:
            cordoned.add(node_id)
        self._view.set_cordoned(frozenset(cordoned))

    async def follow_schedulers(self) -> None:
        await self._follow(
            keys.SCHEDULERS, self._reset_schedulers, self._apply_scheduler, self.schedulers_synced
        )

    def _reset_schedulers(self, entries: list[Entry]) -> None:
        records = _records(entries, codec.scheduler_record)
        self.schedulers = {r.scheduler_id for r in records}

    def _apply_scheduler(self, event: Event) -> None:
        if event.kind == "delete":
            self.schedulers.discard(event.key.removeprefix(keys.SCHEDULERS))
        elif (record := decoded(event.key, event.value, codec.scheduler_record)) is not None:
            self.schedulers.add(record.scheduler_id)

    async def _follow(
        self,
        prefix: str,
        reset: Callable[[list[Entry]], None],
        apply: Callable[[Event], None],
        synced: asyncio.Event,
    ) -> None:
        await follow_prefix(self._store, prefix, reset, apply, synced, self._lost)

    def _reset_nodes(self, entries: list[Entry]) -> None:
        records = [r for r in (_node_record(e.key, e.value, e.lease) for e in entries) if r is not None]
        log.info("nodes listed from etcd: %s", ", ".join(sorted(r.node_id for r in records)) or "none")
        for node_id in self._view.reset_nodes(records):
            log.warning("node %s left (gone from etcd)", node_id)
            self._on_node_gone(node_id)

    def _apply_node(self, event: Event) -> None:
        if event.kind == "delete":
            node_id = event.key.removeprefix(keys.NODES)
            log.warning("node %s left (its key was deleted: lease expired or revoked)", node_id)
            self._view.remove_node(node_id)
            self._on_node_gone(node_id)
        elif (record := _node_record(event.key, event.value, event.lease)) is not None:
            if record.node_id not in self._view.nodes:
                log.info("node %s joined", record.node_id)
            self._view.put_node(record)
        elif (node_id := event.key.removeprefix(keys.NODES)) in self._view.nodes:
            log.warning("node %s left (its key no longer holds its registration)", node_id)
            self._view.remove_node(node_id)
            self._on_node_gone(node_id)

    def _reset_functions(self, entries: list[Entry]) -> None:
        self._view.reset_functions(_records(entries, codec.function_record))

    def _apply_function(self, event: Event) -> None:
        if event.kind == "delete":
            self._view.remove_function(*keys.parse_function(event.key))
        elif (record := decoded(event.key, event.value, codec.function_record)) is not None:
            self._view.put_function(record)

    def _reset_tenants(self, entries: list[Entry]) -> None:
        records = _records(entries, codec.tenant_record)
        self.tenants = {r.tenant: r for r in records}

    def _apply_tenant(self, event: Event) -> None:
        if event.kind == "delete":
            self.tenants.pop(event.key.removeprefix(keys.TENANTS), None)
        elif (record := decoded(event.key, event.value, codec.tenant_record)) is not None:
            self.tenants[record.tenant] = record


def _node_record(key: str, value: bytes, lease: int) -> NodeRecord | None:
    """The registration at a node key, or None (logged) for one no live node wrote for itself: a
    node registers under its own lease (so it vanishes with the node) and under its own id (etcd
    lets each node's user write only its own key)."""
    if not lease:
        log.warning("ignoring %s: not under a lease, so no live node stands behind it", key)
        return None
    record = decoded(key, value, codec.node_record)
    if record is not None and keys.node(record.node_id) != key:
        log.warning("ignoring %s: its record names node %r", key, record.node_id)
        return None
    if record is not None and record.wire != version.WIRE:
        log.error(
            "not placing on node %s: it runs hetfaas %s, wire contract %d; this scheduler speaks %d "
            "(finish the upgrade of one of them)",
            record.node_id,
            record.version or "(unknown)",
            record.wire,
            version.WIRE,
        )
        return None
    return record


def decoded(key: str, value: bytes, decoder: msgspec.msgpack.Decoder[R]) -> R | None:
    """The record at `key`, or None for one that does not decode or breaks the rules a record
    of its kind obeys (garbage planted in etcd, or a writer's bug): reported with its key and
    why, and skipped, so that nothing else stops working."""
    try:
        record = decoder.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.error("skipping the unreadable record at %s: %s", key, exc)
        return None
    if isinstance(record, FunctionRecord):
        problems = spec_problems(record.spec)
        if not bundles.is_digest(record.bundle_digest):
            problems.append(f"{record.bundle_digest!r} is not a bundle digest")
        if problems:
            log.error("skipping the record at %s: %s", key, "; ".join(problems))
            return None
    return record


def _records(entries: list[Entry], decoder: msgspec.msgpack.Decoder[R]) -> list[R]:
    return [r for r in (decoded(e.key, e.value, decoder) for e in entries) if r is not None]


async def read_function(store: Store, tenant: str, name: str) -> FunctionRecord | None:
    """The function's record; None when it has none, or none that is readable (reported)."""
    entry = await store.get(keys.function(tenant, name))
    return None if entry is None else decoded(entry.key, entry.value, codec.function_record)


async def write_function(store: Store, record: FunctionRecord) -> int:
    return await store.put(keys.function(record.spec.tenant, record.spec.name), codec.encode(record))


async def remove_function(store: Store, tenant: str, name: str) -> bool:
    """Delete the function, then every program approval it was deployed with: DPU nodes unload
    those programs as they see the approvals go. False: it was gone already."""
    if not await store.delete(keys.function(tenant, name)):
        return False
    approvals, _ = await store.list_prefix(keys.PROGRAMS)
    for entry in approvals:
        _, approved_tenant, function = keys.parse_program(entry.key)
        if (approved_tenant, function) == (tenant, name):
            await store.delete(entry.key)
    return True


async def list_functions(store: Store, tenant: str | None) -> list[FunctionRecord]:
    prefix = keys.tenant_functions(tenant) if tenant else keys.FUNCTIONS
    entries, _ = await store.list_prefix(prefix)
    return _records(entries, codec.function_record)


async def list_schedulers(store: Store) -> list[SchedulerRecord]:
    entries, _ = await store.list_prefix(keys.SCHEDULERS)
    return _records(entries, codec.scheduler_record)


async def function_revision(store: Store, tenant: str, name: str) -> int:
    """The etcd revision the function's record was last written at (0: it has none)."""
    entry = await store.get(keys.function(tenant, name))
    return entry.mod_revision if entry else 0


async def write_program(store: Store, digest: str, tenant: str, name: str, program: ApprovedProgram) -> None:
    """An ebpf function's approved program, stored as approved: whoever loads it checks the
    signature against its own keys."""
    await store.put(keys.program(digest, tenant, name), codec.encode(program))


async def write_tenant(store: Store, record: TenantRecord) -> None:
    await store.put(keys.tenant(record.tenant), codec.encode(record))


async def write_revocation(store: Store, req: RevokeRequest) -> None:
    """Every node that runs eBPF follows these: it unloads the program and refuses it from now on."""
    await store.put(keys.revoked(req.digest), codec.encode(req))


def registration(store: Store, scheduler_id: str, ttl_s: int) -> LeasedKey:
    """The replica's key under a lease (its `run()` keeps it alive), listed in `status`."""
    record = SchedulerRecord(
        scheduler_id=scheduler_id,
        hostname=socket.gethostname(),
        pid=os.getpid(),
        started_at=time.time(),
        version=version.release(),
        wire=version.WIRE,
    )
    return LeasedKey(store, keys.scheduler(scheduler_id), lambda: codec.encode(record), ttl_s)
