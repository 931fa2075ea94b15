"""Running signed eBPF programs: load an approved program on first use (after every check in
admission.py), then run each invocation's payload through it as a packet, in the kernel, within
each tenant's partition. DPU nodes are built on this; host nodes with trusted keys embed it to
take eBPF functions with placement "any" when no DPU has room."""

import asyncio
import logging
import time
from collections import Counter, defaultdict
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ebpf_runtime import map_writes
from ebpf_runtime.admission import LoadRequest, Refused, admit
from ebpf_runtime.loader import Loaded, load
from ebpf_runtime.settings import EbpfRuntimeSettings
from fabric import bpf, bus, nodes, signing, telemetry
from fabric.store import Entry, Event, Store, follow_prefix
from fabric.tasks import TaskSet
from fabric.tracing import Span, recording
from schemas import keys
from schemas.ebpf import MapDump, MapEntry, MapSpec, MapsReply, MapsRequest
from schemas.errors import ErrorCode
from schemas.messages import (
    ApprovedProgram,
    ErrorReply,
    InvokeReply,
    NodeInvoke,
    Partition,
    TenantUsage,
    error_reply,
    instance_key,
)

log = logging.getLogger(__name__)
MAX_DUMP_ENTRIES = 1024
ROOM_REFUSALS = {"partition_full", "node_full"}
ACTIONS = {
    "xdp": {0: "XDP_ABORTED", 1: "XDP_DROP", 2: "XDP_PASS", 3: "XDP_TX", 4: "XDP_REDIRECT"},
    "sched_cls": {0: "TC_ACT_OK", 1: "TC_ACT_RECLASSIFY", 2: "TC_ACT_SHOT", 3: "TC_ACT_PIPE"},
}
_approved = msgspec.msgpack.Decoder(ApprovedProgram)


def partition_of(settings: EbpfRuntimeSettings) -> Partition:
    """What a node offers eBPF tenants, as its registration says it."""
    return Partition(
        concurrency=settings.tenant_concurrency,
        programs=settings.tenant_programs,
        map_memory_bytes=settings.tenant_map_memory_bytes,
    )


class ProgramRuntime:
    def __init__(
        self, settings: EbpfRuntimeSettings, node_id: str, store: Store, trusted: dict[str, Ed25519PublicKey]
    ):
        self.settings = settings
        self.node_id = node_id
        self._store = store
        self._trusted = trusted
        self.revoked: set[str] = set()
        # keys.program(...) -> approved program, its signature verified
        self.programs: dict[str, ApprovedProgram] = {}
        self._verified = signing.VerifiedSignatures()
        self.loaded: dict[tuple[str, str, str], Loaded] = {}  # (tenant, function, digest) -> program
        self._loading: dict[tuple[str, str, str], asyncio.Lock] = {}
        self._cores = asyncio.Semaphore(settings.cores)
        self._tenant_running: defaultdict[str, int] = defaultdict(int)
        self.tenant_runs: defaultdict[str, int] = defaultdict(int)  # accounted per tenant
        self.inflight = 0
        self._metrics = nodes.InvokeMetrics(node_id)
        self.recent = self._metrics.recent  # `hetfaas describe`

    def partition(self) -> Partition:
        return partition_of(self.settings)

    def maps(self, req: MapsRequest) -> MapsReply:
        """The maps of this tenant's function, and nobody else's: the key includes the tenant.
        With a write, the entry is set or deleted in this node's copy first."""
        program = self.loaded.get((req.tenant, req.function, req.program_digest))
        if program is None:
            return MapsReply(maps=[])
        if req.write is not None:
            try:
                done = map_writes.apply(program, req.write)
            except map_writes.MapWriteError as exc:
                return MapsReply(maps=[], refused=[f"{self.node_id}: {exc}"])
            fd, spec = program.maps[req.write.map]
            log.info("%s/%s: map %s: %s by its tenant", req.tenant, req.function, req.write.map, done)
            return MapsReply(maps=[self._dump(req.write.map, fd, spec)], applied=[self.node_id])
        return MapsReply(
            maps=[self._dump(name, fd, spec) for name, (fd, spec) in sorted(program.maps.items())]
        )

    def _dump(self, name: str, fd: int, spec: MapSpec) -> MapDump:
        found = bpf.map_keys(fd, spec.key_size, MAX_DUMP_ENTRIES + 1)
        entries = []
        for key in found[:MAX_DUMP_ENTRIES]:
            value = bpf.map_lookup(fd, key, spec.value_size)
            if value is not None:
                entries.append(MapEntry(key, value))
        return MapDump(
            node=self.node_id,
            name=name,
            spec=spec,
            entries=entries,
            truncated=len(found) > MAX_DUMP_ENTRIES,
        )

    async def traced_invoke(self, req: NodeInvoke, ctx: bus.Context) -> InvokeReply | ErrorReply:
        """`invoke` in the invocation's trace: on a first use, the program's load and its run."""
        with nodes.invoke_span(req, ctx, self.node_id, **self._span_attributes(req)) as span:
            return self._observed(req, span, await self.invoke(req, ctx.received_at))

    def run_now(self, req: NodeInvoke, ctx: bus.Context) -> InvokeReply | ErrorReply | None:
        """A warm invocation with a core free runs here and now, in its trace, with no coroutine
        (the node's fast path); None when it would wait (its program not loaded yet, every core
        busy or promised to invocations already waiting), or is malformed: `traced_invoke`."""
        if self._problem(req) is not None or self._cores.locked():
            return None
        program = self.loaded.get((req.spec.tenant, req.spec.name, req.program_digest))
        if program is None:
            return None
        with nodes.invoke_span(req, ctx, self.node_id, **self._span_attributes(req)) as span:
            busy = self._tenant_busy(req)
            # No yield from here to its end: it holds its core (and its tenant's slot) meanwhile.
            reply = busy if busy is not None else self._ran(req, program, False, 0.0, ctx.received_at)
            return self._observed(req, span, reply)

    def _span_attributes(self, req: NodeInvoke) -> dict[str, str]:
        """faas.instance: the program as this node loaded it (its instance, shared by every call)."""
        digest = req.program_digest
        return {"hetfaas.program": digest, "faas.instance": f"{self.node_id}/{digest}"}

    def _observed(
        self, req: NodeInvoke, span: Span | Any, reply: InvokeReply | ErrorReply
    ) -> InvokeReply | ErrorReply:
        self._metrics.ended(req, reply, span, "dpu")
        if isinstance(reply, InvokeReply) and reply.cold_start and recording(span):
            self._record_load_and_run(span, reply)
        return reply

    def _record_load_and_run(self, span: Span, reply: InvokeReply) -> None:
        start = span.start_ns
        load_ns = round(reply.phases_ms.get("program_load_ms", 0.0) * 1_000_000)
        telemetry.record("dpu.program_load", start, start + load_ns, parent=span)
        end = time.time_ns()
        run_attributes = {"hetfaas.run_ns": reply.run_ns or 0, "hetfaas.action": reply.action}
        telemetry.record(
            "dpu.run", max(start + load_ns, end - (reply.run_ns or 0)), end, run_attributes, span
        )

    async def invoke(self, req: NodeInvoke, received_at: float) -> InvokeReply | ErrorReply:
        if (problem := self._problem(req)) is not None:
            return problem
        tenant = req.spec.tenant
        self.inflight += 1
        try:
            program, cold, load_ms = await self._program(req)  # waiting for a load is not running
            if (busy := self._tenant_busy(req)) is not None:
                return busy
            self._tenant_running[tenant] += 1
            try:
                async with self._cores:
                    return self._ran(req, program, cold, load_ms, received_at)
            finally:
                self._tenant_running[tenant] -= 1
        except Refused as exc:
            log.warning("refused %s/%s: %s", req.spec.tenant, req.spec.name, exc)
            # No room here is not a verdict on the program: the scheduler tries another node.
            code: ErrorCode = "unavailable" if exc.code in ROOM_REFUSALS else "rejected"
            return error_reply(code, f"{exc.code}: {exc}", req.invocation_id, self.node_id)
        finally:
            self.inflight -= 1

    def _problem(self, req: NodeInvoke) -> ErrorReply | None:
        if req.spec.runtime != "ebpf" or not req.program_digest:
            why = "not an ebpf function (no approved program)"
            return error_reply("bad_request", why, req.invocation_id, self.node_id)
        if len(req.payload) > self.settings.max_packet_bytes:
            why = f"a packet is at most {self.settings.max_packet_bytes} bytes"
            return error_reply("bad_request", why, req.invocation_id, self.node_id)
        return None

    def _tenant_busy(self, req: NodeInvoke) -> ErrorReply | None:
        tenant = req.spec.tenant
        if self._tenant_running[tenant] < self.settings.tenant_concurrency:
            return None
        limit = self.settings.tenant_concurrency
        why = f"tenant {tenant!r} has {limit} programs running here, its share"
        return error_reply("throttled", why, req.invocation_id, self.node_id)

    def _ran(
        self, req: NodeInvoke, program: Loaded, cold: bool, load_ms: float, received_at: float
    ) -> InvokeReply:
        """Run the packet through the program (on a core the caller holds) and account for it."""
        retval, packet, run_ns = program.run(req.payload)
        self.tenant_runs[req.spec.tenant] += 1
        return InvokeReply(
            invocation_id=req.invocation_id,
            node=self.node_id,
            cold_start=cold,
            duration_ms=round((time.monotonic() - received_at) * 1000, 3),
            output=packet,
            phases_ms={"program_load_ms": load_ms} if cold else {},
            attempts=req.attempt,
            retval=retval,
            action=ACTIONS.get(req.spec.ebpf.prog_type if req.spec.ebpf else "", {}).get(retval, ""),
            run_ns=run_ns,
        )

    async def _program(self, req: NodeInvoke) -> tuple[Loaded, bool, float]:
        """The loaded program (loading it on first use): (program, loaded now, load time ms)."""
        key = (req.spec.tenant, req.spec.name, req.program_digest)
        if (program := self.loaded.get(key)) is not None:
            return program, False, 0.0
        async with self._loading.setdefault(key, asyncio.Lock()):
            if (program := self.loaded.get(key)) is not None:
                return program, False, 0.0
            started = time.monotonic()
            where = keys.program(req.program_digest, req.spec.tenant, req.spec.name)
            approved = self.programs.get(where) or await self._fetch(where)
            request = LoadRequest(
                tenant=req.spec.tenant,
                function=req.spec.name,
                prog_type=approved.prog_type,
                maps=approved.maps,
                map_refs=approved.map_refs,
                instructions=approved.instructions,
                signed=approved.signed,
            )
            attestation = admit(
                request, self._trusted, self.revoked, time.time(), self._verified, self.settings.load_modes
            )
            self._check_partition(request)
            program = await asyncio.to_thread(load, request, attestation)
            self.loaded[key] = program
            log.info("loaded %s/%s (%s)", req.spec.tenant, req.spec.name, req.program_digest[:19])
            return program, True, round((time.monotonic() - started) * 1000, 3)

    async def _fetch(self, where: str) -> ApprovedProgram:
        """A program deployed after the last watch event (or while etcd was away)."""
        entry = await self._store.get(where)
        if entry is None:
            raise Refused("unknown_program", f"no approved program at {where}")
        return _approved.decode(entry.value)

    async def start_following(self, tasks: TaskSet, timeout_s: float) -> None:
        """Follow revocations and approved programs in etcd; returns once both are listed, so
        nothing is served before this node knows what is revoked."""
        revocations, programs = asyncio.Event(), asyncio.Event()
        tasks.spawn(self.follow_revocations(revocations), "revocations")
        tasks.spawn(self.follow_programs(programs), "programs")
        async with asyncio.timeout(timeout_s):
            await revocations.wait()
            await programs.wait()

    async def follow_programs(self, synced: asyncio.Event) -> None:
        """Approved programs as they are deployed: kept here and their signatures verified now, so
        a function's first invocation pays neither an etcd read nor an Ed25519 verification."""
        await follow_prefix(self._store, keys.PROGRAMS, self._reset_programs, self._apply_program, synced)

    def _reset_programs(self, entries: list[Entry]) -> None:
        self.programs = {}
        for entry in entries:
            self._remember(entry.key, entry.value)

    def _apply_program(self, event: Event) -> None:
        if event.kind == "put":
            self._remember(event.key, event.value)
            return
        # The approval was withdrawn (its function removed): the program leaves the kernel, and
        # its maps with it, freeing the tenant's partition.
        self.programs.pop(event.key, None)
        digest, tenant, function = keys.parse_program(event.key)
        if (tenant, function, digest) in self.loaded:
            self._unload((tenant, function, digest), "its function was removed")

    def _remember(self, where: str, value: bytes) -> None:
        try:
            approved = _approved.decode(value)
            signing.check(approved.signed, self._trusted, time.time(), self._verified)
        except (msgspec.DecodeError, signing.AttestationError) as exc:
            log.warning("approved program %s not trusted here: %s", where.removeprefix(keys.PROGRAMS), exc)
            return  # a load would refuse it anyway, with its reason
        self.programs[where] = approved

    def _check_partition(self, request: LoadRequest) -> None:
        mine = [p for (tenant, _, _), p in self.loaded.items() if tenant == request.tenant]
        if len(mine) >= self.settings.tenant_programs:
            raise Refused(
                "partition_full", f"tenant {request.tenant!r} has {len(mine)} programs loaded, its limit"
            )
        used = sum(spec.memory_bytes for p in mine for _, spec in p.maps.values())
        wanted = sum(spec.memory_bytes for spec in request.maps)
        if used + wanted > self.settings.tenant_map_memory_bytes:
            raise Refused("partition_full", f"tenant {request.tenant!r} would exceed its map memory")
        total = sum(spec.memory_bytes for p in self.loaded.values() for _, spec in p.maps.values())
        if total + wanted > self.settings.map_memory_bytes:
            raise Refused("node_full", "this DPU's map memory is used up")

    def warm_keys(self) -> dict[str, int]:
        """Loaded programs, as the scheduler keys warm instances (see scheduler.view.warm_key)."""
        return {instance_key(t, f, digest): 1 for t, f, digest in self.loaded}

    def tenant_usage(self) -> dict[str, TenantUsage]:
        """Each tenant's partition in use: programs running, programs loaded, map memory."""
        programs: Counter[str] = Counter()
        map_bytes: Counter[str] = Counter()
        for (tenant, _, _), program in self.loaded.items():
            programs[tenant] += 1
            map_bytes[tenant] += sum(spec.memory_bytes for _, spec in program.maps.values())
        return {
            tenant: TenantUsage(
                running=self._tenant_running[tenant], programs=count, map_memory_bytes=map_bytes[tenant]
            )
            for tenant, count in programs.items()
        }

    async def follow_revocations(self, synced: asyncio.Event) -> None:
        await follow_prefix(self._store, keys.REVOKED, self._reset_revoked, self._apply_revoked, synced)

    def _reset_revoked(self, entries: list[Entry]) -> None:
        self.revoked = {entry.key.removeprefix(keys.REVOKED) for entry in entries}
        self._unload_revoked()

    def _apply_revoked(self, event: Event) -> None:
        digest = event.key.removeprefix(keys.REVOKED)
        if event.kind == "put":
            self.revoked.add(digest)
            self._unload_revoked()
        else:
            self.revoked.discard(digest)

    def _unload_revoked(self) -> None:
        for key in [k for k in self.loaded if k[2] in self.revoked]:
            self._unload(key, "revoked")

    def _unload(self, key: tuple[str, str, str], why: str) -> None:
        tenant, function, digest = key
        log.warning("unloading program %s of %s/%s: %s", digest, tenant, function, why)
        self.loaded.pop(key).close()

    def close(self) -> None:
        for program in self.loaded.values():
            program.close()
        self.loaded.clear()


def trusted_keys(texts: list[str]) -> dict[str, Ed25519PublicKey]:
    """The verifier keys pinned in a node's settings, by key id; none is a configuration error."""
    trusted = {signing.key_id(k): k for k in map(signing.public_key_from_text, texts)}
    if not trusted:
        raise ValueError("trusted_keys is empty: this node would load nothing (pin the verifier's key)")
    return trusted
