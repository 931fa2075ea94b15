"""The scheduler's control handlers: deploy, remove, list, logs, maps, revoke and tenant limits.
What they store goes through `state` (the only module that touches etcd); what they ask of
nodes goes through the replica's requester."""

import asyncio
import logging
import time
from typing import Any

import msgspec
import nats.errors

from fabric import bundles, bus, telemetry
from fabric.bundles import BundleError, BundleStore, digest_of
from fabric.connection import Connection
from fabric.store import STORE_ERRORS, Store
from scheduler import state
from scheduler.describe import describe
from scheduler.layers import LayerAssembly, LayerRefused
from scheduler.settings import SchedulerSettings
from scheduler.view import ClusterView
from schemas import codec, ebpf, keys, subjects
from schemas.ebpf import map_write_problem
from schemas.manifest import name_problems, spec_problems
from schemas.messages import (
    ApprovedProgram,
    DeployReply,
    DeployRequest,
    DescribeReply,
    DescribeRequest,
    DrainNode,
    DrainReply,
    ErrorReply,
    FunctionList,
    FunctionRecord,
    FunctionRemoved,
    FunctionSpec,
    ListFunctions,
    LogsReply,
    LogsRequest,
    RemoveFunction,
    RemoveReply,
    SetTenant,
    TenantRecord,
    TenantReply,
    UploadBundle,
    UploadReply,
    error_reply,
)

log = logging.getLogger(__name__)
MAX_LOG_LINES = 10_000  # `hetfaas logs --tail`: each node sends at most 1 MiB anyway
NODE_QUESTION_S = 5.0  # a node that cannot say what it holds in this long has nothing to show


def not_deployed(tenant: str, function: str, invocation_id: str = "") -> ErrorReply:
    why = f"function {function!r} is not deployed for tenant {tenant!r}"
    return error_reply("not_found", why, invocation_id)


def program_digest_of(program: ApprovedProgram) -> str:
    return ebpf.program_digest(program.instructions, program.maps, program.map_refs)


class Control:
    def __init__(
        self,
        settings: SchedulerSettings,
        view: ClusterView,
        store: Store,
        bundles: BundleStore,
        nc: Connection,
        requester: bus.Requester,
        tenants: dict[str, TenantRecord],
    ):
        self.settings = settings
        self._view = view
        self._store = store
        self._bundles = bundles
        self._nc = nc
        self._requester = requester
        self._tenants = tenants  # the replica's followed tenant records (state.ClusterSync)
        self._layers = LayerAssembly(bundles, settings.max_layer_bytes)

    def routes(self, queue: str) -> list[bus.Route]:
        """A tenant's requests on `hetfaas.control.<tenant>.<verb>` (each acts only for the tenant
        its subject names), and the operator's on `hetfaas.admin.*`."""
        deployed = bus.Traced("scheduler.deploy", _deploy_attributes, _deployed)
        removed = bus.Traced("scheduler.remove", _remove_attributes)
        tenant_requests: list[tuple[str, Any, Any, Any, bus.Traced | None]] = [
            (subjects.DEPLOY, codec.deploy_request, self.on_deploy, lambda r: r.spec.tenant, deployed),
            (subjects.UPLOAD, codec.upload_bundle, self.on_upload, None, None),
            (subjects.REMOVE, codec.remove_function, self.on_remove, lambda r: r.tenant, removed),
            (subjects.LOGS, codec.logs_request, self.on_logs, lambda r: r.tenant, None),
            (subjects.LIST_FUNCTIONS, codec.list_functions, self.on_list, lambda r: r.tenant, None),
            (subjects.MAPS, codec.maps_request, self.on_maps, lambda r: r.tenant, None),
            (subjects.DESCRIBE, codec.describe_request, self.on_describe, lambda r: r.tenant, None),
        ]
        routes = [
            bus.Route(
                subjects.control("*", verb),
                decoder,
                _for_the_subjects_tenant(handler, tenant_of),
                queue,
                span=span,
                tenant_reply=True,
            )
            for verb, decoder, handler, tenant_of, span in tenant_requests
        ]
        return [
            *routes,
            bus.Route(subjects.ALL_FUNCTIONS, codec.list_functions, self.on_list, queue),
            bus.Route(subjects.REVOKE, codec.revoke_request, self.on_revoke, queue),
            bus.Route(subjects.SET_TENANT, codec.set_tenant, self.on_set_tenant, queue),
            bus.Route(subjects.DRAIN, codec.drain_node, self.on_drain, queue),
        ]

    async def on_upload(self, req: UploadBundle, ctx: bus.Context) -> UploadReply | ErrorReply:
        """Store a tenant's bundle (or say whether it is stored): the bytes must hash to `digest`."""
        if not bundles.is_digest(req.digest):
            return error_reply("bad_request", f"{req.digest!r} is not a bundle digest (sha256-<64 hex>)")
        try:
            if req.parts:
                await self._layers.assemble(req.digest, req.parts)
                return UploadReply(digest=req.digest, stored=True)
            prefix = bundles.PART_PREFIX if req.part else ""
            if not req.data:
                return UploadReply(digest=req.digest, stored=await self._bundles.holds(req.digest, prefix))
            if digest_of(req.data) != req.digest:
                return error_reply("bad_request", f"the bundle's bytes do not hash to {req.digest}")
            try:
                if not req.part:  # a layer's part is checked with the whole layer
                    bundles.check(req.data)
            except BundleError as exc:
                return error_reply("bad_request", f"the bundle cannot be deployed: {exc}")
            await self._bundles.upload(req.data, prefix=prefix)
        except LayerRefused as exc:
            return error_reply("bad_request", str(exc))
        except (BundleError, *STORE_ERRORS, nats.errors.Error) as exc:
            return error_reply("unavailable", f"cannot store the bundle now: {exc}")
        return UploadReply(digest=req.digest, stored=True)

    async def on_deploy(self, req: DeployRequest, ctx: bus.Context) -> DeployReply | ErrorReply:
        problems = spec_problems(req.spec)
        if problems:
            return error_reply("bad_request", "invalid function spec: " + "; ".join(problems))
        if (req.spec.runtime == "ebpf") != (req.program is not None):
            why = "an ebpf function, and only one, comes with its approved program"
            return error_reply("bad_request", why)
        if req.program is not None and not _approved_for(req.program, req.spec):
            why = f"the program was approved for another function than {req.spec.tenant}/{req.spec.name}"
            return error_reply("unauthorized", why)
        if not bundles.is_digest(req.bundle_digest):
            return error_reply(
                "bad_request", f"{req.bundle_digest!r} is not a bundle digest (sha256-<64 hex>)"
            )
        if req.program is not None and (untrusted := self._untrusted(req.program, req.spec)):
            return error_reply("unauthorized", untrusted)
        if req.layer_digest and (req.spec.runtime != "python" or not bundles.is_digest(req.layer_digest)):
            return error_reply(
                "bad_request", f"layer {req.layer_digest!r}: a python function's layer digest only"
            )
        try:
            # the upload just before checked the bytes (`holds`): a deploy reads no bundle again
            for what, digest in (("bundle", req.bundle_digest), ("layer", req.layer_digest)):
                if digest and not await self._bundles.exists(digest):
                    return error_reply("not_found", f"{what} {digest} was not uploaded to the bundle store")
            return await self._store_function(req)
        except STORE_ERRORS as exc:
            return error_reply("unavailable", f"cannot deploy while etcd is unreachable: {exc}")

    async def _store_function(self, req: DeployRequest) -> DeployReply:
        """The approved program (if any), then the function's record, unless it is unchanged."""
        spec, program_digest = req.spec, ""
        if req.program is not None:
            program_digest = program_digest_of(req.program)
            await state.write_program(self._store, program_digest, spec.tenant, spec.name, req.program)
        current = await state.read_function(self._store, spec.tenant, spec.name)
        unchanged = (spec, req.bundle_digest, program_digest, req.layer_digest)
        if current is not None and (
            (current.spec, current.bundle_digest, current.program_digest, current.layer_digest) == unchanged
        ):
            revision = await state.function_revision(self._store, spec.tenant, spec.name)
            return DeployReply(function=current, revision=revision, updated=False)
        record = FunctionRecord(
            spec=spec,
            bundle_digest=req.bundle_digest,
            bundle_size=req.bundle_size,
            deployed_at=time.time(),
            program_digest=program_digest,
            map_memory_bytes=sum(m.memory_bytes for m in req.program.maps) if req.program else 0,
            program_key=req.program.signed.key_id if req.program else "",
            layer_digest=req.layer_digest,
        )
        revision = await state.write_function(self._store, record)
        self._view.put_function(record)
        log.info("deployed %s/%s (%s)", spec.tenant, spec.name, req.bundle_digest)
        return DeployReply(function=record, revision=revision, updated=True)

    async def on_remove(self, req: RemoveFunction, ctx: bus.Context) -> RemoveReply | ErrorReply:
        if problems := name_problems(tenant=req.tenant, name=req.name):
            return error_reply("bad_request", "; ".join(problems))
        try:
            record = await state.read_function(self._store, req.tenant, req.name)
            if record is None or not await state.remove_function(self._store, req.tenant, req.name):
                return not_deployed(req.tenant, req.name)  # (or another replica removed it meanwhile)
        except STORE_ERRORS as exc:
            return error_reply("unavailable", f"cannot remove while etcd is unreachable: {exc}")
        self._view.remove_function(req.tenant, req.name)  # before the watch says so: no new placements
        removed = FunctionRemoved(tenant=req.tenant, name=req.name, deployed_at=record.deployed_at)
        await self._nc.publish(subjects.FUNCTION_REMOVED, codec.encode(removed))
        log.info("removed %s/%s (%s)", req.tenant, req.name, record.bundle_digest)
        return RemoveReply(function=record)

    async def on_list(self, req: ListFunctions, ctx: bus.Context) -> FunctionList | ErrorReply:
        try:
            records = await state.list_functions(self._store, req.tenant)
        except STORE_ERRORS as exc:
            return error_reply("unavailable", f"cannot list functions while etcd is unreachable: {exc}")
        return FunctionList(functions=sorted(records, key=lambda r: (r.spec.tenant, r.spec.name)))

    async def on_set_tenant(self, req: SetTenant, ctx: bus.Context) -> TenantReply | ErrorReply:
        if problems := name_problems(tenant=req.tenant):
            return error_reply("bad_request", "; ".join(problems))
        if not 1 <= req.max_concurrency <= 1_000_000:
            return error_reply("bad_request", "max_concurrency must be in 1..1000000")
        if not 1 <= req.weight <= 1000:
            return error_reply("bad_request", "weight must be in 1..1000")
        record = TenantRecord(tenant=req.tenant, max_concurrency=req.max_concurrency, weight=req.weight)
        try:
            await state.write_tenant(self._store, record)
        except STORE_ERRORS as exc:
            return error_reply("unavailable", f"cannot set tenant limits while etcd is unreachable: {exc}")
        self._tenants[req.tenant] = record
        return TenantReply(record=record)

    async def on_revoke(self, req: ebpf.RevokeRequest, ctx: bus.Context) -> ebpf.RevokeReply | ErrorReply:
        """Record a revocation in etcd; every DPU node watches them, unloads and refuses the program."""
        if not bundles.is_digest(req.digest):  # programs are named the same way
            return error_reply("bad_request", f"{req.digest!r} is not a program digest (sha256-<64 hex>)")
        now = time.time()
        try:
            await state.write_revocation(self._store, req)
        except STORE_ERRORS as exc:
            return error_reply("unavailable", f"cannot revoke while etcd is unreachable: {exc}")
        log.warning("revoked program %s: %s", req.digest, req.reason or "no reason given")
        return ebpf.RevokeReply(digest=req.digest, revoked_at=now)

    async def on_maps(self, req: ebpf.MapsRequest, ctx: bus.Context) -> ebpf.MapsReply | ErrorReply:
        """A tenant's function's maps, gathered from every node that has it loaded (DPUs, and hosts
        that run eBPF); with a write, set or deleted on each of those copies."""
        record = self._view.functions.get((req.tenant, req.function))
        if record is None or not record.program_digest:
            return error_reply("not_found", f"no ebpf function {req.function!r} for tenant {req.tenant!r}")
        if req.write is not None and (problem := map_write_problem(req.write)):
            return error_reply("bad_request", problem)
        ask = msgspec.structs.replace(req, program_digest=record.program_digest)
        runners = self._healthy(lambda n: n.record.runs_ebpf)
        replies = await asyncio.gather(
            *(
                self._ask_node(subjects.node_maps(node_id), ask, node_id, codec.maps_result)
                for node_id in runners
            )
        )
        answered = [r for r in replies if isinstance(r, ebpf.MapsReply)]
        merged = ebpf.MapsReply(
            maps=[dump for r in answered for dump in r.maps],
            applied=sorted(node for r in answered for node in r.applied),
            refused=[why for r in answered for why in r.refused],
        )
        if req.write is not None and merged.refused and not merged.applied:
            return error_reply("bad_request", "; ".join(merged.refused))
        return merged

    async def on_logs(self, req: LogsRequest, ctx: bus.Context) -> LogsReply | ErrorReply:
        """The last lines of a function's output from every host node holding any (a function
        removed since still has them)."""
        if problems := name_problems(tenant=req.tenant, function=req.function):
            return error_reply("bad_request", "; ".join(problems))
        if not 1 <= req.lines <= MAX_LOG_LINES:
            return error_reply("bad_request", f"lines must be in 1..{MAX_LOG_LINES}")
        hosts = sorted(self._healthy(lambda n: n.record.kind == "host"))
        replies = await asyncio.gather(
            *(
                self._ask_node(subjects.node_logs(node_id), req, node_id, codec.logs_result)
                for node_id in hosts
            )
        )
        found = [logs for reply in replies if isinstance(reply, LogsReply) for logs in reply.logs]
        if not found and (req.tenant, req.function) not in self._view.functions:
            return not_deployed(req.tenant, req.function)
        return LogsReply(logs=found)

    async def on_describe(self, req: DescribeRequest, ctx: bus.Context) -> DescribeReply | ErrorReply:
        """The function's record and revision, where it is warm, and what it ran lately."""
        if problems := name_problems(tenant=req.tenant, function=req.function):
            return error_reply("bad_request", "; ".join(problems))
        record = self._view.functions.get((req.tenant, req.function))
        if record is None:
            try:
                record = await state.read_function(self._store, req.tenant, req.function)
            except STORE_ERRORS:
                return error_reply(
                    "unavailable", f"function {req.function!r} is unknown here and etcd is unreachable"
                )
        if record is None:
            return not_deployed(req.tenant, req.function)
        ebpf_function = record.spec.runtime == "ebpf"
        nodes = self._healthy(lambda n: n.record.runs_ebpf if ebpf_function else n.record.kind == "host")
        return await describe(req, record, self._view, self._store, sorted(nodes), self._ask_node)

    async def on_drain(self, req: DrainNode, ctx: bus.Context) -> DrainReply | ErrorReply:
        """Cordon a node in etcd (every replica follows the cordons: nothing more is placed on it)
        and tell it to release its warm instances; or lift the cordon. A node that cannot be told
        (it is down) is cordoned all the same."""
        if req.node_id not in self._view.nodes and req.drain:
            known = ", ".join(sorted(self._view.nodes)) or "none"
            return error_reply("not_found", f"no node {req.node_id!r} is registered (nodes: {known})")
        try:
            if req.drain:
                await self._store.put(keys.cordon(req.node_id), f"{time.time():.3f}".encode())
            else:
                await self._store.delete(keys.cordon(req.node_id))
        except STORE_ERRORS as exc:
            return error_reply(
                "unavailable", f"cannot change {req.node_id}'s cordon while etcd is unreachable: {exc}"
            )
        cordoned = self._view.cordoned | {req.node_id} if req.drain else self._view.cordoned - {req.node_id}
        self._view.set_cordoned(frozenset(cordoned))  # this replica at once; the others by the watch
        answer = await self._ask_node(subjects.node_drain(req.node_id), req, req.node_id, codec.drain_result)
        if isinstance(answer, DrainReply):
            return answer
        note = answer.error.message if isinstance(answer, ErrorReply) else "the node did not answer"
        return DrainReply(node_id=req.node_id, cordoned=req.drain, note=note)

    def _untrusted(self, program: ApprovedProgram, spec: FunctionSpec) -> str | None:
        """Why no node that could run the program would load it (none trusts its key), if so.
        With no such node registered yet, nothing is known: the deploy is recorded."""
        runners = [
            n.record
            for n in self._view.nodes.values()
            if n.record.runs_ebpf and (spec.placement == "any" or n.record.kind == "dpu")
        ]
        key = program.signed.key_id
        if not runners or any(key in r.trusted_keys or not r.trusted_keys for r in runners):
            return None
        names = ", ".join(sorted(r.node_id for r in runners))
        return (
            f"the program is signed by verifier key {key}, which none of the nodes that could run it "
            f"({names}) trusts: give them the key (`hetfaas cluster plan` distributes the verifier's keys)"
        )

    def _healthy(self, which: Any) -> list[str]:
        now, stale = time.monotonic(), self.settings.node_stale_after_s
        return [n.node_id for n in self._view.nodes.values() if which(n) and n.healthy(now, stale)]

    async def _ask_node(
        self, subject: str, req: msgspec.Struct, node_id: str, decoder: msgspec.msgpack.Decoder
    ) -> Any:
        """A node's answer to a question about what it holds; None from a node that cannot
        answer (it has nothing to show)."""
        try:
            data = await self._requester.request(subject, codec.encode(req), NODE_QUESTION_S, None, node_id)
        except (bus.NoResponders, bus.PeerLost, bus.RequestTimeout):
            return None
        return decoder.decode(data)


def _approved_for(program: ApprovedProgram, spec: FunctionSpec) -> bool:
    """Whether the verifier signed the program for this tenant's function (nodes check the
    signature; this refuses a borrowed approval at deploy, with a clear error)."""
    try:
        attestation = msgspec.msgpack.decode(program.signed.attestation, type=ebpf.Attestation)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False
    return (attestation.tenant, attestation.function) == (spec.tenant, spec.name)


def _for_the_subjects_tenant(handler: Any, tenant_of: Any) -> Any:
    """`handler` for a request that names the tenant its subject names: NATS let only that
    tenant (or the operator) publish there, so the subject is who asks; a body naming another
    tenant is refused."""

    async def checked(req: Any, ctx: bus.Context) -> Any:
        parsed = subjects.parse_control(ctx.subject)
        asker = parsed[0] if parsed else ""
        if tenant_of is not None and tenant_of(req) != asker:
            why = f"credentials of tenant {asker!r} cannot act for tenant {tenant_of(req)!r}"
            return error_reply("unauthorized", why)
        return await handler(req, ctx)

    return checked


def _deploy_attributes(req: DeployRequest) -> dict[str, Any]:
    return {
        "faas.name": req.spec.name,
        "hetfaas.tenant": req.spec.tenant,
        "hetfaas.bundle": req.bundle_digest,
    }


def _deployed(span: Any, reply: DeployReply | ErrorReply) -> None:
    telemetry.noted(span, reply)
    if not isinstance(reply, ErrorReply):
        span.set_attribute("hetfaas.updated", reply.updated)


def _remove_attributes(req: RemoveFunction) -> dict[str, Any]:
    return {"faas.name": req.name, "hetfaas.tenant": req.tenant}
