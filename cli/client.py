"""Async Python client for a hetfaas cluster: deploy, invoke, list, status. Talks only NATS."""

import asyncio
import functools
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import nats.errors

from cli import deploying, function_dir, layers
from fabric import bus, credentials, otel_bridge, telemetry, trace_stream
from fabric.connection import Connection
from schemas import codec, subjects
from schemas.ebpf import (
    MapsReply,
    MapsRequest,
    MapWrite,
    RevokeReply,
    RevokeRequest,
    VerifyReply,
    VerifyRequest,
)
from schemas.errors import Error
from schemas.manifest import name_problems
from schemas.messages import (
    ApprovedProgram,
    ClusterStatus,
    DeployReply,
    DeployRequest,
    DescribeReply,
    DescribeRequest,
    DrainNode,
    DrainReply,
    ErrorReply,
    FunctionRecord,
    FunctionSpec,
    InvokeReply,
    InvokeRequest,
    ListFunctions,
    LogPosition,
    LogsReply,
    LogsRequest,
    RemoveFunction,
    RemoveReply,
    SetTenant,
    StatusRequest,
    TenantReply,
)

CONTROL_TIMEOUT_S = 10.0
VERIFY_TIMEOUT_S = 30.0  # a verification runs the kernel verifier: seconds, not milliseconds
VERIFY_WAIT_S = 10.0
REPLY_GRACE_S = 1.0  # the scheduler answers before the deadline; this covers the trip back
# An invocation unanswered this long is sent again (then after 2x, 4x...): its scheduler replica
# may have died holding it. The copy has the same id and reply subject: nodes run an id once
# and the first answer wins, so a copy costs a little work, never a second run on one node.
RETRY_AFTER_MS = 2000
# "No responders" means no scheduler received the request (nothing ran), so sending it again is
# safe. A scheduler whose connection the server closed (a restart; a retired signing key, whose
# users the servers disconnect) is subscribed again after one reconnect (nats-py waits 0.25 s,
# then connects): wait a few times that before telling the caller no scheduler is running.
NO_SCHEDULER_PATIENCE_S = 2.0


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


class _RandomIds:
    """Invocation ids: 128 random bits each, so that seeing one says nothing of the next (nodes
    key their answers by id: a guessable id could be planted ahead). Read from the kernel 256 at
    a time: a getrandom() call per invocation cost more than the rest of making one."""

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def next(self) -> str:
        if self._at >= len(self._pool):
            self._pool, self._at = os.urandom(16 * 256), 0
        self._at += 16
        return self._pool[self._at - 16 : self._at].hex()


_ids = _RandomIds()


@functools.lru_cache(maxsize=1024)  # checked on every invocation; the names in use are few
def _invalid_names(tenant: str, function: str) -> str:
    """Why these names cannot make an invoke subject ("" when they can): a dot, a space or a
    wildcard would make one no scheduler listens on, or none at all."""
    return "; ".join(name_problems(tenant=tenant, function=function))


def next_invocation_id() -> str:
    return _ids.next()


def _quiet(_line: str) -> None:
    pass


MIN_COPY_TIMEOUT_MS = 200  # a copy with less time left than this would only time out


async def _while_no_scheduler(send: Callable[[], Awaitable[bytes]], until: float) -> bytes:
    """`send()`, again after a pause while no scheduler is subscribed, until `until` (monotonic)."""
    pause_s = 0.05
    while True:
        try:
            return await send()
        except bus.NoResponders:
            if time.monotonic() + pause_s > until:
                raise
        await asyncio.sleep(pause_s)
        pause_s = min(pause_s * 2, 0.4)


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


def unauthorized(message: str) -> ClientError:
    return ClientError(Error(code="unauthorized", message=message))


class Client:
    """A tenant's client (tenant credentials: it acts for that tenant only), or the operator's
    (it acts for any tenant, and manages the cluster)."""

    def __init__(self, nc: Connection, identity: credentials.Identity | None = None):
        self.nc = nc
        self.identity = identity
        # Invocations use shared-inbox requesters: no per-request random token or wait_for
        # task, which is a good share of a client's CPU per warm invocation. A tenant's
        # requests get their replies under the tenant's inbox (the services check it), so an
        # operator's client keeps one requester per tenant it acts for.
        self._requester = bus.Requester(nc)
        self._for_tenant: dict[str, bus.Requester] = {}

    @classmethod
    async def connect(
        cls,
        nats_url: str,
        name: str = "hetfaas-cli",
        wait_for_server: bool = False,
        creds: str = "",
        ca: str = "",
    ) -> "Client":
        """A client; by default it fails at once (NoServersError) when NATS is not reachable.
        `creds` is a NATS credentials file; a bad one raises ClientError `unauthorized`. `ca`:
        the CA file of a cluster whose NATS speaks TLS (`nats_ca` in its cluster.json)."""
        identity = None
        if creds:
            try:
                identity = credentials.read_creds(creds)
            except credentials.CredentialsError as exc:
                raise unauthorized(str(exc)) from None
        if identity is not None and identity.role == "tenant":
            inbox = subjects.tenant_inbox(identity.tenant)
        else:
            inbox = subjects.service_inbox("operator", identity.name) if identity else ""
        try:
            nc = await bus.connect(nats_url, name, wait_for_server, creds=creds, inbox_prefix=inbox, ca=ca)
        except credentials.CredentialsError as exc:
            raise unauthorized(str(exc)) from None
        except nats.errors.Error as exc:
            if "maximum account active connections" in str(exc):
                message = "the tenant has as many connections open as its account allows; close one"
                raise ClientError(Error(code="throttled", message=message)) from None
            if "authorization" in str(exc).lower():
                who = f"the credentials in {creds}" if creds else "a client without credentials"
                raise unauthorized(
                    f"the cluster refused {who} (unknown, revoked or another cluster's)"
                ) from None
            raise
        return cls(nc, identity)

    @property
    def tenant(self) -> str:
        """The tenant these credentials are ("" for the operator's)."""
        return self.identity.tenant if self.identity and self.identity.role == "tenant" else ""

    def acting_for(self, tenant: str) -> bus.Requester:
        """The requester of `tenant`'s requests; refused for a tenant these credentials are not."""
        requester = self._for_tenant.get(tenant)
        if requester is None:
            if problems := name_problems(tenant=tenant):
                raise ClientError(Error(code="bad_request", message=f"invalid tenant: {'; '.join(problems)}"))
            if self.tenant and tenant != self.tenant:
                raise unauthorized(f"credentials of tenant {self.tenant!r} cannot act for tenant {tenant!r}")
            requester = self._for_tenant[tenant] = bus.Requester(self.nc, subjects.tenant_inbox(tenant))
        return requester

    async def close(self) -> None:
        """Deliver what is in flight and close; a connection the server already closed is fine
        (its credentials were revoked, or signed by a retired key)."""
        await bus.close(self.nc)

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
        try:
            requester = self.acting_for(tenant)
        except ClientError as exc:
            return InvokeOutcome(invocation_id, None, exc.error, "", 0.0)
        request = InvokeRequest(
            invocation_id=invocation_id,
            tenant=tenant,
            function=function,
            payload=payload,
            timeout_ms=timeout_ms,
        )
        started = time.monotonic()
        traced = parent = None  # with tracing off, no attributes built for nothing
        if telemetry.enabled():
            traced = {"faas.invocation_id": invocation_id, "faas.name": function, "hetfaas.tenant": tenant}
            parent = otel_bridge.api_context()
        client_span = telemetry.span(
            "client.invoke", parent=parent, kind=telemetry.SpanKind.CLIENT, attributes=traced, deferrable=True
        )
        with client_span as span:
            result = await self._send_invoke(requester, request, retry_after_ms, started)
            telemetry.ended(span, result)
        latency_ms = (time.monotonic() - started) * 1000
        if isinstance(result, ErrorReply):
            return InvokeOutcome(invocation_id, None, result.error, result.node, latency_ms)
        return InvokeOutcome(invocation_id, result, None, result.node, latency_ms)

    async def _send_invoke(
        self, requester: bus.Requester, request: InvokeRequest, retry_after_ms: int, started: float
    ) -> InvokeReply | ErrorReply:
        """The answer, or the error the caller hears when none comes (no scheduler, no answer in time)."""
        timeout_ms = request.timeout_ms
        try:
            resend = None
            if 0 < retry_after_ms < timeout_ms:
                resend = bus.Resend(retry_after_ms / 1000, lambda n: _copy(request, n, started))
            data = await _while_no_scheduler(
                lambda: requester.request(
                    subjects.invoke(request.tenant, request.function),
                    codec.encode(request),
                    timeout_ms / 1000 + REPLY_GRACE_S,
                    telemetry.trace_headers(),
                    "scheduler",
                    resend,
                ),
                started + min(timeout_ms / 1000, NO_SCHEDULER_PATIENCE_S),
            )
            return codec.invoke_result.decode(data)
        except bus.NoResponders:
            why = Error(code="unavailable", message="no scheduler is running")
        except bus.RequestTimeout:
            why = Error(code="timeout", message=f"no answer within {timeout_ms} ms")
        return ErrorReply(error=why, invocation_id=request.invocation_id)

    async def deploy(
        self, path: Path, tenant: str | None = None, progress: layers.Progress | None = None
    ) -> DeployReply:
        """Upload the bundle (content-addressed: unchanged code is not sent again), then register.
        An ebpf function is verified first; a rejection raises ProgramRejected with the verdict.
        A python function's requirements are built into its dependency layer first (from the
        deployer's cache when built before), saying how it goes to `progress`."""
        try:
            spec, bundle = function_dir.read(path)
        except function_dir.FunctionDirError as exc:
            raise ClientError(Error(code="bad_request", message=str(exc))) from None
        tenant = tenant or self.tenant or None  # a tenant's credentials deploy as that tenant
        if tenant is not None:
            spec = msgspec.structs.replace(spec, tenant=tenant)
        attributes = {"faas.name": spec.name, "hetfaas.tenant": spec.tenant, "hetfaas.runtime": spec.runtime}
        parent = otel_bridge.api_context()
        with telemetry.span(
            "client.deploy", parent=parent, kind=telemetry.SpanKind.CLIENT, attributes=attributes
        ):
            program = None
            if spec.runtime == "ebpf":
                try:
                    obj = function_dir.ebpf_object(path, spec)
                except function_dir.FunctionDirError as exc:
                    raise ClientError(Error(code="bad_request", message=str(exc))) from None
                program = await self._approve(spec, obj)
            layer_digest = ""
            if spec.python is not None and spec.python.requirements:
                try:
                    layer_digest = await deploying.layer(
                        self._control, spec.tenant, spec.python.requirements, progress or _quiet
                    )
                except layers.LayerError as exc:
                    raise ClientError(Error(code="bad_request", message=str(exc))) from None
            digest = await deploying.upload(self._control, spec.tenant, bundle)
            request = DeployRequest(
                spec=spec,
                bundle_digest=digest,
                bundle_size=len(bundle),
                program=program,
                layer_digest=layer_digest,
            )
            return await self._control(
                subjects.control(spec.tenant, subjects.DEPLOY), request, codec.deploy_result, spec.tenant
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
            mode=spec.ebpf.verify_mode,
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
        parent = otel_bridge.api_context()
        with telemetry.span(
            "client.remove", parent=parent, kind=telemetry.SpanKind.CLIENT, attributes=attributes
        ):
            request = RemoveFunction(tenant=tenant, name=name)
            return await self._control(  # not sent again: a second copy would say "not deployed"
                subjects.control(tenant, subjects.REMOVE), request, codec.remove_result, tenant, False
            )

    async def logs(
        self,
        tenant: str,
        function: str,
        lines: int = 100,
        since: float = 0.0,
        after: dict[str, LogPosition] | None = None,
    ) -> LogsReply:
        """The last `lines` lines of the function's output on each host node holding any (only
        those written since `since`, unix seconds; or after each node's position in `after`)."""
        request = LogsRequest(tenant=tenant, function=function, lines=lines, since=since, after=after or {})
        return await self._control(
            subjects.control(tenant, subjects.LOGS), request, codec.logs_result, tenant
        )

    async def describe(self, tenant: str, function: str) -> DescribeReply:
        """The function's record, where it is warm, and its recent invocations (every node's)."""
        request = DescribeRequest(tenant=tenant, function=function)
        subject = subjects.control(tenant, subjects.DESCRIBE)
        return await self._control(subject, request, codec.describe_result, tenant)

    async def functions(self, tenant: str | None = None) -> list[FunctionRecord]:
        """One tenant's functions (a tenant's credentials: its own), or, for the operator,
        every tenant's."""
        tenant = tenant or self.tenant or None
        if tenant is None:
            reply = await self._control(subjects.ALL_FUNCTIONS, ListFunctions(), codec.list_result)
        else:
            subject = subjects.control(tenant, subjects.LIST_FUNCTIONS)
            reply = await self._control(subject, ListFunctions(tenant=tenant), codec.list_result, tenant)
        return reply.functions

    async def maps(self, tenant: str, function: str, write: MapWrite | None = None) -> MapsReply:
        """The function's maps as the DPU nodes that run it hold them (a tenant sees only its own);
        with a write, that entry set or deleted on every node's copy first."""
        request = MapsRequest(tenant=tenant, function=function, write=write)
        return await self._control(
            subjects.control(tenant, subjects.MAPS), request, codec.maps_result, tenant
        )

    async def revoke(self, digest: str, reason: str = "") -> RevokeReply:
        return await self._control(
            subjects.REVOKE, RevokeRequest(digest=digest, reason=reason), codec.revoke_result
        )

    async def drain(self, node_id: str, drain: bool = True) -> DrainReply:
        """Cordon a node and release its warm instances (`drain` False: uncordon it)."""
        return await self._control(
            subjects.DRAIN, DrainNode(node_id=node_id, drain=drain), codec.drain_result
        )

    async def set_tenant(self, tenant: str, max_concurrency: int, weight: int = 1) -> TenantReply:
        return await self._control(
            subjects.SET_TENANT,
            SetTenant(tenant=tenant, max_concurrency=max_concurrency, weight=weight),
            codec.tenant_result,
        )

    async def status(self) -> ClusterStatus:
        return await self._control(subjects.STATUS, StatusRequest(), codec.status_result)

    async def verify(self, request: VerifyRequest, wait_s: float = VERIFY_WAIT_S) -> VerifyReply:
        """Verify (and, for a function, sign) an eBPF object. Waits up to `wait_s` for a verifier
        to answer (one may still be starting)."""
        attributes = {"faas.name": request.function, "hetfaas.tenant": request.tenant}
        parent = otel_bridge.api_context()
        with telemetry.span(
            "client.verify", parent=parent, kind=telemetry.SpanKind.CLIENT, attributes=attributes
        ):
            return await self._verify(request, wait_s)

    async def _verify(self, request: VerifyRequest, wait_s: float) -> VerifyReply:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                data = await self.acting_for(request.tenant).request(
                    subjects.verify(request.tenant),
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
            except ClientError as exc:
                if exc.error.code == "unauthorized":  # waiting will not change who these creds are
                    raise
                # else no scheduler serves yet
            if check is not None and (problem := check()):
                raise ClientError(Error(code="unavailable", message=problem))
            if time.monotonic() > deadline:
                raise ClientError(Error(code="timeout", message=f"cluster not ready within {timeout_s:.0f}s"))
            await asyncio.sleep(0.1)

    async def trace_batches(self, since_s: float) -> list[bytes]:
        """A planned cluster's spans of the last `since_s` seconds, as the services published them."""
        return await trace_stream.read(self.nc.jetstream(), since_s)

    async def _control(
        self,
        subject: str,
        message: msgspec.Struct,
        decoder: msgspec.msgpack.Decoder,
        tenant: str = "",
        idempotent: bool = True,
        timeout_s: float = CONTROL_TIMEOUT_S,
    ) -> Any:
        """A control request: a tenant's (its replies under the tenant's inbox), or the
        operator's (`tenant` empty). An `idempotent` one is sent again when the client
        reconnects: a request written just as its NATS server died is lost (core NATS is
        at-most-once), and the client, failed over to another server, would otherwise hear
        nothing for `timeout_s` (measured: a deploy right after a kill -9 of the server timed
        out at 10 s; sent again, it was answered at once)."""
        if not tenant and self.tenant:  # NATS would refuse it, and the caller would hear a timeout
            raise unauthorized(
                f"{subject} is the operator's; these are credentials of tenant {self.tenant!r}"
            )
        requester = self.acting_for(tenant) if tenant else self._requester
        try:
            data = await requester.request(
                subject,
                codec.encode(message),
                timeout_s,
                telemetry.trace_headers(),
                "scheduler",
                idempotent=idempotent,
            )
        except bus.NoResponders:
            raise ClientError(Error(code="unavailable", message="no scheduler is running")) from None
        except bus.RequestTimeout:
            raise ClientError(Error(code="timeout", message=f"no answer on {subject}")) from None
        reply = decoder.decode(data)
        if isinstance(reply, ErrorReply):
            raise ClientError(reply.error)
        return reply
