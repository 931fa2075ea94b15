"""Async Python client for a hetfaas cluster: deploy, invoke, list, status. Talks only NATS."""

import asyncio
import functools
import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from fabric import bus, telemetry
from fabric.bundles import BundleStore, pack_directory
from fabric.connection import Connection
from schemas import codec, subjects
from schemas.ebpf import MapsReply, MapsRequest, RevokeReply, RevokeRequest, VerifyReply, VerifyRequest
from schemas.errors import Error
from schemas.manifest import name_problems, parse_manifest
from schemas.messages import (
    ApprovedProgram,
    ClusterStatus,
    DeployReply,
    DeployRequest,
    ErrorReply,
    FunctionRecord,
    FunctionSpec,
    InvokeReply,
    InvokeRequest,
    ListFunctions,
    LogsReply,
    LogsRequest,
    RemoveFunction,
    RemoveReply,
    SetTenant,
    StatusRequest,
    TenantReply,
)

MANIFEST = "function.toml"
MAX_BUNDLE_BYTES = 64 * 1024 * 1024
CONTROL_TIMEOUT_S = 10.0
VERIFY_TIMEOUT_S = 30.0  # a verification runs the kernel verifier: seconds, not milliseconds
VERIFY_WAIT_S = 10.0
REPLY_GRACE_S = 1.0  # the scheduler answers before the deadline; this covers the trip back
# An invocation unanswered this long is sent again (then after 2x, 4x...): its scheduler replica
# may have died holding it. The copy has the same id and reply subject: nodes run an id once
# and the first answer wins, so a copy costs a little work, never a second run on one node.
RETRY_AFTER_MS = 2000


class ClientError(Exception):
    """A structured error from the cluster (or from the client's own checks)."""

    def __init__(self, error: Error):
        super().__init__(f"{error.code}: {error.message}")
        self.error = error


class InvokeOutcome(msgspec.Struct, frozen=True):
    """One invocation's answer: exactly one of `reply` and `error` is set."""

    invocation_id: str
    reply: InvokeReply | None
    error: Error | None
    node: str
    latency_ms: float  # as the client saw it

    @property
    def ok(self) -> bool:
        return self.error is None


# Invocation ids: a random 64-bit prefix per process and a counter. Unique like a uuid4, without
# a getrandom() system call per invocation.
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count()


@functools.lru_cache(maxsize=1024)  # checked on every invocation; the names in use are few
def _invalid_names(tenant: str, function: str) -> str:
    """Why these names cannot make an invoke subject ("" when they can): a dot, a space or a
    wildcard would make one no scheduler listens on, or none at all."""
    return "; ".join(name_problems(tenant=tenant, function=function))


def next_invocation_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):08x}"


def read_function_dir(path: Path) -> tuple[FunctionSpec, bytes]:
    """The spec from `function.toml` and the packed bundle of its directory."""
    manifest = path if path.is_file() else path / MANIFEST
    if not manifest.is_file():
        raise ClientError(Error(code="bad_request", message=f"no {MANIFEST} at {path}"))
    spec = parse_manifest(manifest.read_text())
    return spec, pack_directory(manifest.parent, MAX_BUNDLE_BYTES)


def _read_ebpf_object(path: Path, spec: FunctionSpec) -> bytes:
    assert spec.ebpf is not None
    obj = (path if path.is_dir() else path.parent) / spec.ebpf.object
    if not obj.is_file():
        raise ClientError(
            Error(code="bad_request", message=f"the object {obj} does not exist (build it first)")
        )
    return obj.read_bytes()


MIN_COPY_TIMEOUT_MS = 200  # a copy with less time left than this would only time out


def _copy(request: InvokeRequest, attempt: int, started: float) -> bytes | None:
    """The invocation sent again: same id, what is left of the deadline, marked as a copy."""
    left_ms = request.timeout_ms - int((time.monotonic() - started) * 1000)
    if left_ms < MIN_COPY_TIMEOUT_MS:
        return None
    return codec.encode(msgspec.structs.replace(request, attempt=attempt, timeout_ms=left_ms))


class ProgramRejected(ClientError):
    """The verifier rejected an ebpf function's program: `verdict` says why."""

    def __init__(self, verdict: VerifyReply):
        self.verdict = verdict
        first = verdict.reasons[0].message if verdict.reasons else "rejected"
        super().__init__(Error(code="rejected", message=f"the verifier rejected the program: {first}"))


class Client:
    def __init__(self, nc: Connection):
        self.nc = nc
        self._bundles = BundleStore(nc.jetstream())
        # Invocations use the shared-inbox requester: no per-request random token or wait_for
        # task, which is a good share of a client's CPU per warm invocation.
        self._requester = bus.Requester(nc)

    @classmethod
    async def connect(
        cls, nats_url: str, name: str = "hetfaas-cli", wait_for_server: bool = False
    ) -> "Client":
        """A client; by default it fails at once (NoServersError) when NATS is not reachable."""
        return cls(await bus.connect(nats_url, name, wait_for_server))

    async def close(self) -> None:
        await self.nc.drain()

    async def invoke(
        self,
        tenant: str,
        function: str,
        payload: bytes = b"",
        timeout_ms: int = 30_000,
        invocation_id: str | None = None,
        retry_after_ms: int = RETRY_AFTER_MS,
    ) -> InvokeOutcome:
        """Invoke and wait for the answer; `retry_after_ms=0` never sends the invocation again."""
        invocation_id = invocation_id or next_invocation_id()
        if problems := _invalid_names(tenant, function):
            return InvokeOutcome(invocation_id, None, Error(code="bad_request", message=problems), "", 0.0)
        request = InvokeRequest(
            invocation_id=invocation_id,
            tenant=tenant,
            function=function,
            payload=payload,
            timeout_ms=timeout_ms,
        )
        started = time.monotonic()
        traced = None  # with tracing off, no attributes built for nothing
        if telemetry.enabled():
            traced = {"faas.invocation_id": invocation_id, "faas.name": function, "hetfaas.tenant": tenant}
        with telemetry.span("client.invoke", kind=telemetry.SpanKind.CLIENT, attributes=traced):
            try:
                resend = None
                if 0 < retry_after_ms < timeout_ms:
                    resend = bus.Resend(retry_after_ms / 1000, lambda n: _copy(request, n, started))
                data = await self._requester.request(
                    subjects.invoke(tenant, function),
                    codec.encode(request),
                    timeout_ms / 1000 + REPLY_GRACE_S,
                    telemetry.trace_headers(),
                    "scheduler",
                    resend,
                )
                result = codec.invoke_result.decode(data)
            except bus.NoResponders:
                result = ErrorReply(
                    error=Error(code="unavailable", message="no scheduler is running"),
                    invocation_id=invocation_id,
                )
            except bus.RequestTimeout:
                result = ErrorReply(
                    error=Error(code="timeout", message=f"no answer within {timeout_ms} ms"),
                    invocation_id=invocation_id,
                )
        latency_ms = (time.monotonic() - started) * 1000
        if isinstance(result, ErrorReply):
            return InvokeOutcome(invocation_id, None, result.error, result.node, latency_ms)
        return InvokeOutcome(invocation_id, result, None, result.node, latency_ms)

    async def deploy(self, path: Path, tenant: str | None = None) -> DeployReply:
        """Upload the bundle (content-addressed: unchanged code is not sent again), then register.
        An ebpf function is verified first; a rejection raises ProgramRejected with the verdict."""
        spec, bundle = read_function_dir(path)
        if tenant is not None:
            spec = msgspec.structs.replace(spec, tenant=tenant)
        attributes = {"faas.name": spec.name, "hetfaas.tenant": spec.tenant, "hetfaas.runtime": spec.runtime}
        with telemetry.span("client.deploy", kind=telemetry.SpanKind.CLIENT, attributes=attributes):
            program = None
            if spec.runtime == "ebpf":
                program = await self._approve(spec, _read_ebpf_object(path, spec))
            digest = await self._bundles.upload(bundle)
            return await self._control(
                subjects.DEPLOY,
                DeployRequest(spec=spec, bundle_digest=digest, bundle_size=len(bundle), program=program),
                codec.deploy_result,
            )

    async def _approve(self, spec: FunctionSpec, obj: bytes) -> ApprovedProgram:
        """Have the verifier check and sign the function's program."""
        assert spec.ebpf is not None
        request = VerifyRequest(
            tenant=spec.tenant,
            function=spec.name,
            object=obj,
            program=spec.ebpf.program,
            prog_type=spec.ebpf.prog_type,
        )
        reply = await self.verify(request)
        if not reply.accepted or reply.signed is None:
            raise ProgramRejected(reply)
        return ApprovedProgram(
            instructions=reply.instructions,
            prog_type=spec.ebpf.prog_type,  # what the verifier checked it as
            maps=reply.maps,
            map_refs=reply.map_refs,
            signed=reply.signed,
        )

    async def remove(self, tenant: str, name: str) -> RemoveReply:
        """Take the function out of service (see `RemoveFunction`)."""
        attributes = {"faas.name": name, "hetfaas.tenant": tenant}
        with telemetry.span("client.remove", kind=telemetry.SpanKind.CLIENT, attributes=attributes):
            request = RemoveFunction(tenant=tenant, name=name)
            return await self._control(subjects.REMOVE, request, codec.remove_result)

    async def logs(self, tenant: str, function: str, lines: int = 100) -> LogsReply:
        """The last `lines` lines of the function's output on each host node holding any."""
        request = LogsRequest(tenant=tenant, function=function, lines=lines)
        return await self._control(subjects.LOGS, request, codec.logs_result)

    async def functions(self, tenant: str | None = None) -> list[FunctionRecord]:
        reply = await self._control(subjects.LIST_FUNCTIONS, ListFunctions(tenant=tenant), codec.list_result)
        return reply.functions

    async def maps(self, tenant: str, function: str) -> MapsReply:
        """The function's maps as the DPU nodes that run it hold them (a tenant sees only its own)."""
        return await self._control(
            subjects.MAPS, MapsRequest(tenant=tenant, function=function), codec.maps_result
        )

    async def revoke(self, digest: str, reason: str = "") -> RevokeReply:
        return await self._control(
            subjects.REVOKE, RevokeRequest(digest=digest, reason=reason), codec.revoke_result
        )

    async def set_tenant(self, tenant: str, max_concurrency: int) -> TenantReply:
        return await self._control(
            subjects.SET_TENANT,
            SetTenant(tenant=tenant, max_concurrency=max_concurrency),
            codec.tenant_result,
        )

    async def status(self) -> ClusterStatus:
        return await self._control(subjects.STATUS, StatusRequest(), codec.status_result)

    async def verify(self, request: VerifyRequest, wait_s: float = VERIFY_WAIT_S) -> VerifyReply:
        """Verify (and, for a function, sign) an eBPF object. Waits up to `wait_s` for a verifier
        to answer (one may still be starting)."""
        attributes = {"faas.name": request.function, "hetfaas.tenant": request.tenant}
        with telemetry.span("client.verify", kind=telemetry.SpanKind.CLIENT, attributes=attributes):
            return await self._verify(request, wait_s)

    async def _verify(self, request: VerifyRequest, wait_s: float) -> VerifyReply:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                data = await self._requester.request(
                    subjects.VERIFY,
                    codec.encode(request),
                    VERIFY_TIMEOUT_S,
                    telemetry.trace_headers(),
                    "verifier",
                )
                break
            except bus.NoResponders:
                if time.monotonic() > deadline:
                    raise ClientError(Error(code="unavailable", message="no verifier is running")) from None
                await asyncio.sleep(0.2)
            except bus.RequestTimeout:
                raise ClientError(Error(code="timeout", message="the verifier did not answer")) from None
        reply = codec.verify_result.decode(data)
        if isinstance(reply, ErrorReply):
            raise ClientError(reply.error)
        return reply

    async def wait_until_ready(
        self,
        hosts: int,
        schedulers: int = 1,
        timeout_s: float = 60.0,
        check: Callable[[], str | None] | None = None,
    ) -> ClusterStatus:
        """Poll status until `hosts` nodes are healthy and `schedulers` replicas serve (a replica
        registers once it serves). `check` may report a reason to give up early (a dead process)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                status = await self.status()
                if sum(n.healthy for n in status.nodes) >= hosts and len(status.schedulers) >= schedulers:
                    return status
            except ClientError:
                pass  # no scheduler serves yet
            if check is not None and (problem := check()):
                raise ClientError(Error(code="unavailable", message=problem))
            if time.monotonic() > deadline:
                raise ClientError(Error(code="timeout", message=f"cluster not ready within {timeout_s:.0f}s"))
            await asyncio.sleep(0.1)

    async def _control(self, subject: str, message: msgspec.Struct, decoder: msgspec.msgpack.Decoder) -> Any:
        try:
            data = await self._requester.request(
                subject, codec.encode(message), CONTROL_TIMEOUT_S, telemetry.trace_headers(), "scheduler"
            )
        except bus.NoResponders:
            raise ClientError(Error(code="unavailable", message="no scheduler is running")) from None
        except bus.RequestTimeout:
            raise ClientError(Error(code="timeout", message=f"no answer on {subject}")) from None
        reply = decoder.decode(data)
        if isinstance(reply, ErrorReply):
            raise ClientError(reply.error)
        return reply
