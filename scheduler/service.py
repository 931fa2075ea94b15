"""Scheduler NATS handlers: invoke (see invoke.py), deploy, list, status, tenants, heartbeats
of nodes and of the other replicas."""

import asyncio
import functools
import logging
import time
from typing import Any

import msgspec
import nats

from fabric import bus, metrics
from fabric.bundles import BundleStore
from fabric.connection import Connection
from fabric.store import STORE_ERRORS, Store
from scheduler import shares, state
from scheduler.capacity import Room
from scheduler.capacity import room as capacity_room
from scheduler.control import Control, not_deployed
from scheduler.gate import HAND_OVER_REPLY
from scheduler.invoke import Invoker, invoke_attributes
from scheduler.settings import SchedulerSettings
from scheduler.view import ClusterView
from schemas import codec, subjects
from schemas.messages import (
    ClusterStatus,
    ErrorReply,
    FunctionRecord,
    HaveIt,
    Heartbeat,
    InvokeRequest,
    ReplicaBeat,
    StatusRequest,
    WhereIs,
    error_reply,
)

log = logging.getLogger(__name__)
# The replicas whose beats are kept (a real cluster runs a handful): past this, only a silent
# one's place is given to a newcomer, so ids a message names cannot grow the table.
MAX_REPLICAS = 64
STALE_BEATS_FORGOTTEN = 30  # beat intervals of silence after which a replica's last beat goes
MAX_INVOCATION_ID = 128
ROOM_REFRESH_S = 0.1  # how often the room tenants keep for their recent use is worked out again


def _note_error_code(span: Any, reply: ErrorReply | bytes | None) -> None:
    """An invocation's error is an attribute of the scheduler's span (the outcome is the node's),
    and keeps its trace."""
    if isinstance(reply, ErrorReply):
        span.set_attribute("hetfaas.error", reply.error.code)
        span.keep()


INVOKE_SPAN = bus.Traced("scheduler.invoke", invoke_attributes, _note_error_code, deferrable=True)


class Scheduler:
    def __init__(self, settings: SchedulerSettings, nc: Connection, store: Store, bundles: BundleStore):
        self.settings = settings
        self.view = ClusterView()
        self._store = store
        self._bundles = bundles
        self._nc = nc
        self._requester = bus.Requester(nc)
        self.sync = state.ClusterSync(store, self.view, self._node_gone)
        self._heartbeat_seen = asyncio.Event()
        # Nodes that left etcd while still beating, with invocations in flight (`_node_gone`):
        # at most the registered nodes, each for one staleness period after it stops beating.
        self._left_beating: set[str] = set()
        self.replica_beats: dict[str, tuple[ReplicaBeat, float]] = {}
        self.foreign_claims = 0  # beats that named another identity than their subject
        self.refused_beats = 0  # beats of replicas beyond MAX_REPLICAS
        self._replicas: tuple[shares.Replicas, float] | None = None
        self._room, self._room_at = Room(0, 0, {}), 0.0
        self.fenced = False  # set by the app's fence (fence.py)
        self.invoker = Invoker(
            settings, nc, self.view, self._requester, self.replicas, self.tenant_limit, self.tenant_weight
        )
        self.control = Control(settings, self.view, store, bundles, nc, self._requester, self.sync.tenants)
        gate = self.invoker.gate
        registry = metrics.REGISTRY
        registry.gauge(
            "hetfaas.scheduler.queued",
            "Invocations waiting in the queue",
            (),
            lambda: {(): gate.queue.length},
        )
        registry.gauge(
            "hetfaas.scheduler.running",
            "Invocations admitted and not yet answered",
            (),
            lambda: {(): gate.running.total},
        )
        counted = {
            "throttled": "Invocations turned away (queue full or waited too long)",
            "handed_over": "Invocations sent to a replica holding a share of a limit this one has none of",
            "resent": "Callers' copies of an invocation this replica was still handling, dropped",
        }
        for name, description in counted.items():
            registry.gauge(
                f"hetfaas.scheduler.{name}",
                description,
                (),
                functools.partial(_counted, gate.counters, name),
                monotonic=True,
            )

    def view_routes(self) -> list[bus.Route]:
        """What keeps the view fresh. Every replica needs every heartbeat: no queue group."""
        return [
            bus.Route(subjects.HEARTBEAT_ALL, codec.heartbeat, self.on_heartbeat, inline=True),
            bus.Route(subjects.REPLICA_BEAT_ALL, codec.replica_beat, self.on_replica_beat, inline=True),
        ]

    def queue_routes(self) -> list[bus.Route]:
        """What clients ask the queue group; served only once the view is usable (see
        `wait_until_ready`), and not while fenced (fence.py)."""
        queue = subjects.SCHEDULER_QUEUE
        return [
            bus.Route(
                subjects.INVOKE_ALL,
                codec.invoke_request,
                self.on_invoke,
                queue,
                fast=self.on_invoke_now,
                span=INVOKE_SPAN,
                tenant_reply=True,
            ),
            bus.Route(subjects.STATUS, codec.status_request, self.on_status, queue),
            *self.control.routes(queue),
        ]

    def own_routes(self) -> list[bus.Route]:
        """What other replicas send this one by name, and ask every replica."""
        return [
            bus.Route(subjects.WHERE_IS, codec.where_is, self.on_where_is),
            bus.Route(  # a hand-over from a replica, which checked the caller's reply subject
                subjects.replica_invoke(self.settings.scheduler_id),
                codec.invoke_request,
                self.on_invoke,
                fast=self.on_invoke_now,
                span=INVOKE_SPAN,
                reply_header=HAND_OVER_REPLY,
            ),
        ]

    def another_has_a_live_view(self) -> bool:
        """Some other replica beats, lately, with its etcd live and not fenced (fence.py)."""
        cutoff = time.monotonic() - self.settings.beat_interval_s * 3
        return any(
            beat.etcd_ok and not beat.fenced and at >= cutoff
            for rid, (beat, at) in self.replica_beats.items()
            if rid != self.settings.scheduler_id
        )

    async def start(self) -> None:
        await self._requester.start()

    async def wait_until_ready(self) -> None:
        """A replica that joined the queue group before it knew the nodes' load would turn
        invocations away ("no heartbeat yet") while its peers could serve them. So wait for the
        etcd listing and one heartbeat from each registered node, at most one staleness period
        (etcd may be down: then serve what heartbeats alone allow)."""
        try:
            async with asyncio.timeout(self.settings.node_stale_after_s):
                await self.sync.nodes_synced.wait()
                await self.sync.functions_synced.wait()
                await self.sync.tenants_synced.wait()  # limits known before the first invocation
                await self.sync.schedulers_synced.wait()  # and the replicas that share them
                while any(n.heartbeat_at is None for n in self.view.nodes.values()):
                    self._heartbeat_seen.clear()
                    await self._heartbeat_seen.wait()
        except TimeoutError:
            log.warning("serving with a partial view: %s", self.view.explain_no_node(time.monotonic(), 0))

    # --- invoke ---

    def on_invoke_now(self, req: InvokeRequest, ctx: bus.Context) -> bus.Pass | None:
        """The fast path (`Invoker.try_now`) for a well-formed invocation of a function in the
        view: None once taken (the node, or the retry, answers); a bad request, a lookup in etcd
        and anything that waits go to `on_invoke` (PASS)."""
        if self._check_invoke(req, ctx.subject):
            return bus.PASS
        record = self.view.functions.get((req.tenant, req.function))
        return None if record is not None and self.invoker.try_now(req, record, ctx) else bus.PASS

    async def on_invoke(self, req: InvokeRequest, ctx: bus.Context) -> ErrorReply | bytes | None:
        reply = await self._invoke(req, ctx)
        self.invoker.metrics.answered(reply)
        return reply

    async def _invoke(self, req: InvokeRequest, ctx: bus.Context) -> ErrorReply | bytes | None:
        problem = self._check_invoke(req, ctx.subject)
        if problem:
            return error_reply("bad_request", problem, req.invocation_id)
        if self.invoker.is_resent(req, ctx.reply):  # before the lookup: its function may be gone by now
            return None
        record = self.view.functions.get((req.tenant, req.function)) or await self._lookup(req)
        if isinstance(record, ErrorReply):
            return record
        return await self.invoker.invoke(req, record, ctx)

    def _check_invoke(self, req: InvokeRequest, subject: str) -> str | None:
        handed_over = subjects.is_replica_invoke(subject)
        if not handed_over and subjects.parse_invoke(subject) != (req.tenant, req.function):
            return f"subject {subject} does not match tenant {req.tenant!r} and function {req.function!r}"
        if req.attempt < 1:
            return "attempt must be 1 or more"
        if not req.invocation_id or len(req.invocation_id) > MAX_INVOCATION_ID:
            return f"invocation_id must be 1..{MAX_INVOCATION_ID} characters"
        if len(req.payload) > self.settings.max_payload_bytes:
            return f"payload is {len(req.payload)} bytes, over the limit of {self.settings.max_payload_bytes}"
        if not self.settings.reply_margin_ms < req.timeout_ms <= self.settings.max_timeout_ms:
            return (
                f"timeout_ms must be in {self.settings.reply_margin_ms + 1}..{self.settings.max_timeout_ms}"
            )
        return None

    async def _lookup(self, req: InvokeRequest) -> FunctionRecord | ErrorReply:
        """A function missing from the view may be deployed a moment ago via another replica."""
        try:
            record = await state.read_function(self._store, req.tenant, req.function)
        except STORE_ERRORS:
            return error_reply(
                "unavailable",
                f"function {req.function!r} is unknown here and etcd is unreachable",
                req.invocation_id,
            )
        if record is not None:
            self.view.put_function(record)
            return record
        if not self.view.has_tenant(req.tenant):
            return error_reply(
                "not_found", f"unknown tenant {req.tenant!r} (no functions deployed)", req.invocation_id
            )
        return not_deployed(req.tenant, req.function, req.invocation_id)

    def _node_gone(self, node_id: str) -> None:
        """`node_id` left etcd (its key deleted, or missing from a re-list). If it still beats, it
        lives, and its lease lapsed (measured: a node's 2 s lease across a kill -9 of etcd's
        leader; 12 calls it was running were answered "may have run"): what it runs is left
        to finish, and failed only if its heartbeats stop too (`watch_staleness`)."""
        heard = self.view.last_heard(node_id)
        if heard is not None and time.monotonic() - heard <= self.settings.node_stale_after_s:
            if self._requester.in_flight(node_id):
                self._left_beating.add(node_id)
                log.warning("node %s left etcd but still beats: its invocations in flight go on", node_id)
            return
        self._node_lost(node_id)

    def _node_lost(self, node_id: str) -> None:
        failed = self._requester.fail_peer(node_id)
        if failed:
            log.warning(
                "node %s lost with %d invocations in flight; answered 'may have run', not run again",
                node_id,
                failed,
            )

    async def watch_staleness(self) -> None:
        """Fail requests waiting on nodes that stopped heartbeating, without waiting for their
        lease; and on nodes that left etcd while beating, once they stop."""
        stale_after_s = self.settings.node_stale_after_s
        while True:
            await asyncio.sleep(stale_after_s / 3)
            now = time.monotonic()
            for node_id in self.view.stale_nodes(now, stale_after_s):
                if self._requester.in_flight(node_id):
                    self._node_lost(node_id)
            for node_id in list(self._left_beating):
                heard = self.view.last_heard(node_id)
                if node_id in self.view.nodes or not self._requester.in_flight(node_id):
                    self._left_beating.discard(node_id)  # registered again, or nothing to fail
                elif heard is None or now - heard > stale_after_s:
                    self._left_beating.discard(node_id)
                    self._node_lost(node_id)

    # --- heartbeats ---

    def on_heartbeat(self, hb: Heartbeat, ctx: bus.Context) -> None:
        if ctx.subject != subjects.heartbeat(hb.node_id):  # only that node may publish its subject
            self._foreign_claim(ctx.subject, hb.node_id)
            return
        self.view.on_heartbeat(hb, ctx.received_at)
        self._heartbeat_seen.set()
        self.invoker.gate.capacity.wake_all()  # the node's partitions or memory may have room now

    # --- the other replicas ---

    def _foreign_claim(self, subject: str, claimed: str) -> None:
        """A beat stating another identity than its subject's (which NATS lets only that identity
        publish) is ignored: one node or replica cannot speak for another. Logged once in 1000."""
        if self.foreign_claims % 1000 == 0:
            log.warning("ignored a beat on %s claiming to be %r", subject, claimed)
        self.foreign_claims += 1

    def on_replica_beat(self, beat: ReplicaBeat, ctx: bus.Context) -> None:
        if ctx.subject != subjects.replica_beat(beat.scheduler_id):
            self._foreign_claim(ctx.subject, beat.scheduler_id)
            return
        known = beat.scheduler_id in self.replica_beats
        if not known and len(self.replica_beats) >= MAX_REPLICAS and not self._forget_stale_replicas():
            if self.refused_beats % 1000 == 0:
                log.warning(
                    "ignored the beat of %s: %d replicas beat already", beat.scheduler_id, MAX_REPLICAS
                )
            self.refused_beats += 1
            return
        self.replica_beats[beat.scheduler_id] = (beat, ctx.received_at)
        if not known:
            self._replicas = None
        if beat.scheduler_id != self.settings.scheduler_id:
            self.invoker.arrivals.arrived_elsewhere(beat.arrivals)
        if not known and beat.scheduler_id != self.settings.scheduler_id:
            log.info("scheduler replica %s joined: %d live", beat.scheduler_id, self.replicas().count)

    def _forget_stale_replicas(self) -> bool:
        """Drop the beats of replicas silent for a long while; whether any were dropped."""
        cutoff = time.monotonic() - self.settings.beat_interval_s * STALE_BEATS_FORGOTTEN
        stale = [rid for rid, (_, at) in self.replica_beats.items() if at < cutoff]
        for rid in stale:
            del self.replica_beats[rid]
        return bool(stale)

    def replicas(self) -> shares.Replicas:
        """The live replicas (this one included), to split limits and node capacity into shares:
        those beating, and those registered in etcd. Counting a replica that has just died
        (until its lease expires) only shrinks the shares; missing one that has just started
        would overcommit. Worked out again at most once a beat interval, not per call."""
        now = time.monotonic()
        cached = self._replicas
        if cached is not None and now - cached[1] < self.settings.beat_interval_s:
            return cached[0]
        last = {rid: at for rid, (_, at) in self.replica_beats.items()}
        stale_s = self.settings.beat_interval_s * 3
        live = shares.live_replicas(self.settings.scheduler_id, last, now, stale_s, self.sync.schedulers)
        self._replicas = (live, now)
        return live

    def beat(self, seq: int) -> ReplicaBeat:
        now = time.monotonic()
        ages = [now - n.heartbeat_at for n in self.view.nodes.values() if n.heartbeat_at is not None]
        etcd_lost_for = self.sync.lost_for(now)
        return ReplicaBeat(
            scheduler_id=self.settings.scheduler_id,
            seq=seq,
            running=self.invoker.gate.running.total,
            queued=self.invoker.gate.queue.length,
            throttled=self.invoker.gate.counters.throttled,
            etcd_ok=etcd_lost_for is None,
            fenced=self.fenced,
            functions=len(self.view.functions),
            view_age_ms=round(max([*ages, etcd_lost_for or 0.0], default=0.0) * 1000, 1),
            nodes_healthy=sum(
                n.healthy(now, self.settings.node_stale_after_s) for n in self.view.nodes.values()
            ),
        )

    async def send_beats(self) -> None:
        seq = 0
        subject = subjects.replica_beat(self.settings.scheduler_id)
        while True:
            arrivals = self.invoker.arrivals.take_fresh()
            beat = msgspec.structs.replace(self.beat(seq), arrivals=arrivals)
            try:
                await self._nc.publish(subject, codec.encode(beat))
            except nats.errors.Error as exc:
                log.warning("replica beat %d not sent: %s", seq, exc)
            seq += 1
            await asyncio.sleep(self.settings.beat_interval_s)

    # --- tenants ---

    def tenant_limit(self, tenant: str) -> int:
        """The tenant's own limit (`hetfaas tenant set`), else the default: the smaller of
        `tenant_max_concurrency` and `tenant_default_share` of the healthy nodes' capacity; and
        at most the room the other recently active tenants keep not (capacity.py)."""
        record = self.sync.tenants.get(tenant)
        settings = self.settings
        now = time.monotonic()
        refresh_s = settings.placement.snapshot_refresh_ms / 1000
        capacity = self.view.snapshot(now, settings.node_stale_after_s, refresh_s).capacity
        if record is not None:
            own = record.max_concurrency
        else:
            share = max(1, int(capacity * settings.admission.tenant_default_share))
            own = min(settings.admission.tenant_max_concurrency, share)
        if now >= self._room_at or self._room.capacity != capacity:
            # this replica's peaks stand for its share of each tenant: scaled to the cluster's
            replicas = self.replicas().count
            peaks = {t: peak * replicas for t, peak in self.invoker.gate.peaks.peaks(now).items()}
            self._room = capacity_room(capacity, peaks, self.tenant_weight)
            self._room_at = now + ROOM_REFRESH_S
        return self._room.limit(tenant, own, record.weight if record is not None else 1)

    def unready(self) -> str | None:
        """Why `/readyz` should say no: its view of etcd is not live (health.py)."""
        lost_for = self.sync.lost_for(time.monotonic())
        return None if lost_for is None else f"its view of etcd is {lost_for:.1f} s old (etcd unreachable)"

    def tenant_weight(self, tenant: str) -> int:
        """The tenant's share of the nodes' room while tenants wait for it (capacity.py)."""
        record = self.sync.tenants.get(tenant)
        return record.weight if record is not None else 1

    async def on_where_is(self, req: WhereIs, ctx: bus.Context) -> HaveIt:
        return self.invoker.has_it(req)

    async def on_status(self, req: StatusRequest, ctx: bus.Context) -> ClusterStatus:
        try:
            schedulers = await state.list_schedulers(self._store)
        except STORE_ERRORS:
            schedulers = []  # still show this replica's view of the nodes
        now = time.monotonic()
        stale = self.settings.node_stale_after_s
        live = set(self.replicas().ids)
        beats = [
            beat
            for rid, (beat, _) in self.replica_beats.items()
            if rid in live and rid != self.settings.scheduler_id
        ]
        nodes = sorted(self.view.nodes.values(), key=lambda n: n.node_id)
        return ClusterStatus(
            answered_by=self.settings.scheduler_id,
            schedulers=sorted(schedulers, key=lambda s: s.scheduler_id),
            nodes=[
                msgspec.structs.replace(
                    n.status(now, stale, self.view.held.get(n.node_id, 0)),
                    cordoned=n.node_id in self.view.cordoned,
                )
                for n in nodes
            ],
            functions=len(self.view.functions),
            replicas=sorted([*beats, self.beat(-1)], key=lambda b: b.scheduler_id),
        )


def _counted(counters: object, name: str) -> dict[tuple[str, ...], float]:
    """One of the invoker's running totals, as a metric reads it."""
    return {(): getattr(counters, name)}
