"""Scheduler NATS handlers: invoke (see invoke.py), deploy, list, status, tenants, heartbeats
of nodes and of the other replicas."""

import asyncio
import functools
import logging
import re
import time
from typing import Any

import msgspec
import nats

from fabric import bus, metrics, telemetry
from fabric.bundles import BundleStore
from fabric.connection import Connection
from fabric.store import STORE_ERRORS, Store
from scheduler import shares, state
from scheduler.invoke import Invoker, error, invoke_attributes
from scheduler.settings import SchedulerSettings
from scheduler.view import ClusterView
from schemas import codec, ebpf, keys, subjects
from schemas.manifest import name_problems, spec_problems
from schemas.messages import (
    ApprovedProgram,
    ClusterStatus,
    DeployReply,
    DeployRequest,
    ErrorReply,
    FunctionList,
    FunctionRecord,
    FunctionRemoved,
    Heartbeat,
    InvokeRequest,
    ListFunctions,
    LogsReply,
    LogsRequest,
    RemoveFunction,
    RemoveReply,
    ReplicaBeat,
    SetTenant,
    StatusRequest,
    TenantRecord,
    TenantReply,
)

log = logging.getLogger(__name__)
DIGEST_RE = re.compile(r"^sha256-[0-9a-f]{64}$")

MAX_INVOCATION_ID = 128
MAX_LOG_LINES = 10_000  # `hetfaas logs --tail`: each node sends at most 1 MiB anyway


def not_deployed(tenant: str, function: str, invocation_id: str = "") -> ErrorReply:
    return error("not_found", f"function {function!r} is not deployed for tenant {tenant!r}", invocation_id)


def program_digest_of(program: ApprovedProgram) -> str:
    return ebpf.program_digest(program.instructions, program.maps, program.map_refs)


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
        self.replica_beats: dict[str, tuple[ReplicaBeat, float]] = {}
        self._replicas: tuple[shares.Replicas, float] | None = None
        self.invoker = Invoker(settings, nc, self.view, self._requester, self.replicas, self.tenant_limit)
        invoker = self.invoker
        registry = metrics.REGISTRY
        registry.gauge(
            "hetfaas.scheduler.queued",
            "Invocations waiting in the queue",
            (),
            lambda: {(): invoker.queue.length},
        )
        registry.gauge(
            "hetfaas.scheduler.running",
            "Invocations admitted and not yet answered",
            (),
            lambda: {(): invoker.running.total},
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
                functools.partial(_counted, invoker.counters, name),
                monotonic=True,
            )

    def view_routes(self) -> list[bus.Route]:
        """What keeps the view fresh. Every replica needs every heartbeat: no queue group."""
        return [
            bus.Route(subjects.HEARTBEAT_ALL, codec.heartbeat, self.on_heartbeat, inline=True),
            bus.Route(subjects.REPLICA_BEAT_ALL, codec.replica_beat, self.on_replica_beat, inline=True),
        ]

    def request_routes(self) -> list[bus.Route]:
        """What clients ask; served only once the view is usable (see `wait_until_ready`)."""
        queue = subjects.SCHEDULER_QUEUE
        return [
            bus.Route(
                subjects.INVOKE_ALL, codec.invoke_request, self.on_invoke, queue, fast=self.on_invoke_now
            ),
            bus.Route(subjects.DEPLOY, codec.deploy_request, self.on_deploy, queue),
            bus.Route(subjects.REMOVE, codec.remove_function, self.on_remove, queue),
            bus.Route(subjects.LOGS, codec.logs_request, self.on_logs, queue),
            bus.Route(subjects.LIST_FUNCTIONS, codec.list_functions, self.on_list, queue),
            bus.Route(subjects.STATUS, codec.status_request, self.on_status, queue),
            bus.Route(subjects.MAPS, codec.maps_request, self.on_maps, queue),
            bus.Route(subjects.REVOKE, codec.revoke_request, self.on_revoke, queue),
            bus.Route(subjects.SET_TENANT, codec.set_tenant, self.on_set_tenant, queue),
            bus.Route(
                subjects.replica_invoke(self.settings.scheduler_id),
                codec.invoke_request,
                self.on_invoke,
                fast=self.on_invoke_now,
            ),
        ]

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
        if not telemetry.enabled():
            return await self._invoke(req, ctx)
        with telemetry.span(
            "scheduler.invoke",
            parent=ctx.headers,
            kind=telemetry.SpanKind.SERVER,
            attributes=invoke_attributes(req),
        ) as span:
            reply = await self._invoke(req, ctx)
            if isinstance(reply, ErrorReply):
                span.set_attribute("hetfaas.error", reply.error.code)
            return reply

    async def _invoke(self, req: InvokeRequest, ctx: bus.Context) -> ErrorReply | bytes | None:
        problem = self._check_invoke(req, ctx.subject)
        if problem:
            return error("bad_request", problem, req.invocation_id)
        if self.invoker.is_resent(req):  # before the lookup: its function may be gone by now
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
            return error(
                "unavailable",
                f"function {req.function!r} is unknown here and etcd is unreachable",
                req.invocation_id,
            )
        if record is not None:
            self.view.put_function(record)
            return record
        if not self.view.has_tenant(req.tenant):
            return error(
                "not_found", f"unknown tenant {req.tenant!r} (no functions deployed)", req.invocation_id
            )
        return not_deployed(req.tenant, req.function, req.invocation_id)

    def _node_gone(self, node_id: str) -> None:
        failed = self._requester.fail_peer(node_id)
        if failed:
            log.warning(
                "node %s lost with %d invocations in flight; retrying them elsewhere", node_id, failed
            )

    async def watch_staleness(self) -> None:
        """Fail requests waiting on nodes that stopped heartbeating, without waiting for their lease."""
        period = self.settings.node_stale_after_s / 3
        while True:
            await asyncio.sleep(period)
            for node_id in self.view.stale_nodes(time.monotonic(), self.settings.node_stale_after_s):
                if self._requester.in_flight(node_id):
                    self._node_gone(node_id)

    # --- heartbeats ---

    def on_heartbeat(self, hb: Heartbeat, ctx: bus.Context) -> None:
        self.view.on_heartbeat(hb, ctx.received_at)
        self._heartbeat_seen.set()
        self.invoker.queue.wake_all(("capacity",))  # the node's partitions or memory may have room now

    # --- the other replicas ---

    def on_replica_beat(self, beat: ReplicaBeat, ctx: bus.Context) -> None:
        known = beat.scheduler_id in self.replica_beats
        self.replica_beats[beat.scheduler_id] = (beat, ctx.received_at)
        if not known:
            self._replicas = None
        if beat.scheduler_id != self.settings.scheduler_id:
            self.invoker.arrived_elsewhere(beat.arrivals)
        if not known and beat.scheduler_id != self.settings.scheduler_id:
            log.info("scheduler replica %s joined: %d live", beat.scheduler_id, self.replicas().count)

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
            running=self.invoker.running.total,
            queued=self.invoker.queue.length,
            throttled=self.invoker.counters.throttled,
            etcd_ok=etcd_lost_for is None,
            view_age_ms=round(max([*ages, etcd_lost_for or 0.0], default=0.0) * 1000, 1),
            nodes_healthy=sum(
                n.healthy(now, self.settings.node_stale_after_s) for n in self.view.nodes.values()
            ),
        )

    async def send_beats(self) -> None:
        seq = 0
        subject = subjects.replica_beat(self.settings.scheduler_id)
        while True:
            fresh, self.invoker.fresh_arrivals = self.invoker.fresh_arrivals, {}
            arrivals = {f"{tenant}/{name}": at for (tenant, name), at in fresh.items()}
            beat = msgspec.structs.replace(self.beat(seq), arrivals=arrivals)
            try:
                await self._nc.publish(subject, codec.encode(beat))
            except nats.errors.Error as exc:
                log.warning("replica beat %d not sent: %s", seq, exc)
            seq += 1
            await asyncio.sleep(self.settings.beat_interval_s)

    # --- tenants ---

    def tenant_limit(self, tenant: str) -> int:
        record = self.sync.tenants.get(tenant)
        return record.max_concurrency if record else self.settings.admission.tenant_max_concurrency

    async def on_set_tenant(self, req: SetTenant, ctx: bus.Context) -> TenantReply | ErrorReply:
        if problems := name_problems(tenant=req.tenant):
            return error("bad_request", "; ".join(problems))
        if not 1 <= req.max_concurrency <= 1_000_000:
            return error("bad_request", "max_concurrency must be in 1..1000000")
        record = TenantRecord(tenant=req.tenant, max_concurrency=req.max_concurrency)
        try:
            await self._store.put(keys.tenant(req.tenant), codec.encode(record))
        except STORE_ERRORS as exc:
            return error("unavailable", f"cannot set tenant limits while etcd is unreachable: {exc}")
        self.sync.tenants[req.tenant] = record
        return TenantReply(record=record)

    # --- control ---

    async def on_deploy(self, req: DeployRequest, ctx: bus.Context) -> DeployReply | ErrorReply:
        attributes = {
            "faas.name": req.spec.name,
            "hetfaas.tenant": req.spec.tenant,
            "hetfaas.bundle": req.bundle_digest,
        }
        with telemetry.span(
            "scheduler.deploy", parent=ctx.headers, kind=telemetry.SpanKind.SERVER, attributes=attributes
        ) as span:
            reply = telemetry.noted(span, await self._deploy(req))
            if not isinstance(reply, ErrorReply):
                span.set_attribute("hetfaas.updated", reply.updated)
            return reply

    async def _deploy(self, req: DeployRequest) -> DeployReply | ErrorReply:
        problems = spec_problems(req.spec)
        if problems:
            return error("bad_request", "invalid function spec: " + "; ".join(problems))
        if (req.spec.runtime == "ebpf") != (req.program is not None):
            return error("bad_request", "an ebpf function, and only one, comes with its approved program")
        program_digest = ""
        try:
            if not await self._bundles.exists(req.bundle_digest):
                return error("not_found", f"bundle {req.bundle_digest} was not uploaded to the bundle store")
            if req.program is not None:
                # Stored as approved; whoever loads it checks the signature against its own keys.
                program_digest = program_digest_of(req.program)
                where = keys.program(program_digest, req.spec.tenant, req.spec.name)
                await self._store.put(where, codec.encode(req.program))
            current = await state.read_function(self._store, req.spec.tenant, req.spec.name)
            unchanged = (req.spec, req.bundle_digest, program_digest)
            if (
                current is not None
                and (current.spec, current.bundle_digest, current.program_digest) == unchanged
            ):
                entry = await self._store.get(keys.function(req.spec.tenant, req.spec.name))
                return DeployReply(
                    function=current, revision=entry.mod_revision if entry else 0, updated=False
                )
            record = FunctionRecord(
                spec=req.spec,
                bundle_digest=req.bundle_digest,
                bundle_size=req.bundle_size,
                deployed_at=time.time(),
                program_digest=program_digest,
                map_memory_bytes=sum(m.memory_bytes for m in req.program.maps) if req.program else 0,
            )
            revision = await state.write_function(self._store, record)
        except STORE_ERRORS as exc:
            return error("unavailable", f"cannot deploy while etcd is unreachable: {exc}")
        self.view.put_function(record)
        log.info("deployed %s/%s (%s)", req.spec.tenant, req.spec.name, req.bundle_digest)
        return DeployReply(function=record, revision=revision, updated=True)

    async def on_remove(self, req: RemoveFunction, ctx: bus.Context) -> RemoveReply | ErrorReply:
        attributes = {"faas.name": req.name, "hetfaas.tenant": req.tenant}
        with telemetry.span(
            "scheduler.remove", parent=ctx.headers, kind=telemetry.SpanKind.SERVER, attributes=attributes
        ) as span:
            return telemetry.noted(span, await self._remove(req))

    async def _remove(self, req: RemoveFunction) -> RemoveReply | ErrorReply:
        if problems := name_problems(tenant=req.tenant, name=req.name):
            return error("bad_request", "; ".join(problems))
        try:
            record = await state.read_function(self._store, req.tenant, req.name)
            if record is None or not await state.remove_function(self._store, req.tenant, req.name):
                return not_deployed(req.tenant, req.name)  # (or another replica removed it meanwhile)
        except STORE_ERRORS as exc:
            return error("unavailable", f"cannot remove while etcd is unreachable: {exc}")
        self.view.remove_function(req.tenant, req.name)  # before the watch says so: no new placements
        removed = FunctionRemoved(tenant=req.tenant, name=req.name)
        await self._nc.publish(subjects.FUNCTION_REMOVED, codec.encode(removed))
        log.info("removed %s/%s (%s)", req.tenant, req.name, record.bundle_digest)
        return RemoveReply(function=record)

    async def on_maps(self, req: ebpf.MapsRequest, ctx: bus.Context) -> ebpf.MapsReply | ErrorReply:
        """A tenant's function's maps, gathered from every node that has it loaded (DPUs, and hosts
        that run eBPF)."""
        record = self.view.functions.get((req.tenant, req.function))
        if record is None or not record.program_digest:
            return error("not_found", f"no ebpf function {req.function!r} for tenant {req.tenant!r}")
        ask = msgspec.structs.replace(req, program_digest=record.program_digest)
        now, stale = time.monotonic(), self.settings.node_stale_after_s
        runners = [
            n.node_id for n in self.view.nodes.values() if n.record.runs_ebpf and n.healthy(now, stale)
        ]
        replies = await asyncio.gather(*(self._node_maps(node_id, ask) for node_id in runners))
        return ebpf.MapsReply(maps=[dump for reply in replies for dump in reply])

    async def on_revoke(self, req: ebpf.RevokeRequest, ctx: bus.Context) -> ebpf.RevokeReply | ErrorReply:
        """Record a revocation in etcd; every DPU node watches them, unloads and refuses the program."""
        if not DIGEST_RE.match(req.digest):
            return error("bad_request", f"{req.digest!r} is not a program digest (sha256-<64 hex>)")
        now = time.time()
        try:
            await self._store.put(keys.revoked(req.digest), codec.encode(req))
        except STORE_ERRORS as exc:
            return error("unavailable", f"cannot revoke while etcd is unreachable: {exc}")
        log.warning("revoked program %s: %s", req.digest, req.reason or "no reason given")
        return ebpf.RevokeReply(digest=req.digest, revoked_at=now)

    async def on_logs(self, req: LogsRequest, ctx: bus.Context) -> LogsReply | ErrorReply:
        """The last lines of a function's output from every host node holding any (a function
        removed since still has them)."""
        if problems := name_problems(tenant=req.tenant, function=req.function):
            return error("bad_request", "; ".join(problems))
        if not 1 <= req.lines <= MAX_LOG_LINES:
            return error("bad_request", f"lines must be in 1..{MAX_LOG_LINES}")
        now, stale = time.monotonic(), self.settings.node_stale_after_s
        hosts = sorted(
            n.node_id for n in self.view.nodes.values() if n.record.kind == "host" and n.healthy(now, stale)
        )
        replies = await asyncio.gather(
            *(
                self._ask_node(subjects.node_logs(node_id), req, node_id, codec.logs_result)
                for node_id in hosts
            )
        )
        found = [logs for reply in replies if isinstance(reply, LogsReply) for logs in reply.logs]
        if not found and (req.tenant, req.function) not in self.view.functions:
            return not_deployed(req.tenant, req.function)
        return LogsReply(logs=found)

    async def _node_maps(self, node_id: str, req: ebpf.MapsRequest) -> list[ebpf.MapDump]:
        reply = await self._ask_node(subjects.node_maps(node_id), req, node_id, codec.maps_result)
        return reply.maps if isinstance(reply, ebpf.MapsReply) else []

    async def _ask_node(
        self, subject: str, req: msgspec.Struct, node_id: str, decoder: msgspec.msgpack.Decoder
    ) -> Any:
        """A node's answer to a question about what it holds; None from a node that cannot
        answer (it has nothing to show)."""
        try:
            data = await self._requester.request(subject, codec.encode(req), 5.0, None, node_id)
        except (bus.NoResponders, bus.PeerLost, bus.RequestTimeout):
            return None
        return decoder.decode(data)

    async def on_list(self, req: ListFunctions, ctx: bus.Context) -> FunctionList | ErrorReply:
        try:
            records = await state.list_functions(self._store, req.tenant)
        except STORE_ERRORS as exc:
            return error("unavailable", f"cannot list functions while etcd is unreachable: {exc}")
        return FunctionList(functions=sorted(records, key=lambda r: (r.spec.tenant, r.spec.name)))

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
            nodes=[n.status(now, stale, self.view.held.get(n.node_id, 0)) for n in nodes],
            functions=len(self.view.functions),
            replicas=sorted([*beats, self.beat(-1)], key=lambda b: b.scheduler_id),
        )


def _counted(counters: object, name: str) -> dict[tuple[str, ...], float]:
    """One of the invoker's running totals, as a metric reads it."""
    return {(): getattr(counters, name)}
