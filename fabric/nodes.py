"""What every kind of node does to be seen: a leased registration in etcd and heartbeats on NATS."""

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import nats

from fabric import bus, metrics, telemetry
from fabric.connection import Connection
from fabric.leased import LeasedKey
from fabric.recent import RecentInvocations
from fabric.store import Store
from fabric.tracing import Context, NoScope, Scope
from schemas import codec, keys, subjects, version
from schemas.errors import RETRIED_ELSEWHERE
from schemas.messages import (
    ErrorReply,
    HaveIt,
    Heartbeat,
    InvokeReply,
    NodeInvoke,
    NodeKind,
    NodeRecord,
    Partition,
    WhereIs,
)

log = logging.getLogger(__name__)


def register(
    stack: contextlib.AsyncExitStack,
    store: Store,
    node_id: str,
    kind: NodeKind,
    capacity: int,
    ttl_s: int,
    memory_mb: int = 0,
    partition: Partition | None = None,
    trusted_keys: list[str] | None = None,
) -> LeasedKey:
    """The node's key under a lease (its `run()` keeps it alive); revoked when `stack` closes.
    A node with a partition loads signed eBPF programs signed by one of `trusted_keys` (ids)."""
    record = NodeRecord(
        node_id=node_id,
        kind=kind,
        hostname=socket.gethostname(),
        pid=os.getpid(),
        capacity=capacity,
        started_at=time.time(),
        memory_mb=memory_mb,
        runs_ebpf=partition is not None,
        partition=partition,
        trusted_keys=sorted(trusted_keys or []),
        version=version.release(),
        wire=version.WIRE,
    )
    registration = LeasedKey(store, keys.node(node_id), lambda: codec.encode(record), ttl_s)
    stack.push_async_callback(registration.revoke)
    return registration


async def send_heartbeats(
    nc: Connection, node_id: str, beat: Callable[[int], Heartbeat], interval_s: float
) -> None:
    seq = 0
    while True:
        try:
            await nc.publish(subjects.heartbeat(node_id), codec.encode(beat(seq)))
        except nats.errors.Error as exc:  # e.g. mid-reconnect: the next beat will do
            log.warning("heartbeat %d not sent: %s", seq, exc)
        seq += 1
        await asyncio.sleep(interval_s)


def invoke_span(req: NodeInvoke, ctx: bus.Context, node_id: str, **extra: Any) -> Scope | NoScope:
    """The node's span of an invocation, under the scheduler's attempt that sent it, with the
    FaaS attributes (faas.*) and ours (hetfaas.*)."""
    if not telemetry.enabled():
        return telemetry.span("node.invoke")  # the shared no-op: no attributes built for nothing
    attributes = invoke_attributes(req, node_id, extra)
    return telemetry.span(
        "node.invoke",
        parent=ctx.headers,
        kind=telemetry.SpanKind.SERVER,
        attributes=attributes,
        deferrable=True,
    )


def open_invoke_span(req: NodeInvoke, ctx: bus.Context, node_id: str, **extra: Any) -> Context | None:
    """`invoke_span` for an invocation answered by callback: finish it with `telemetry.close_span`."""
    if not telemetry.enabled():
        return None
    attributes = invoke_attributes(req, node_id, extra)
    return telemetry.open_span(
        "node.invoke",
        parent=ctx.headers,
        kind=telemetry.SpanKind.SERVER,
        attributes=attributes,
        deferrable=True,
    )


def invoke_attributes(req: NodeInvoke, node_id: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "faas.invocation_id": req.invocation_id,
        "faas.name": req.spec.name,
        "faas.trigger": req.trigger,
        "hetfaas.tenant": req.spec.tenant,
        "hetfaas.attempt": req.attempt,
        **extra,
    }


class InvokeMetrics:
    """The OpenTelemetry FaaS metrics every node kind records (seconds, per function), and each
    function's recent invocations for `hetfaas describe`."""

    def __init__(self, node_id: str = "", registry: metrics.Registry = metrics.REGISTRY):
        labels = ("faas.name", "hetfaas.tenant")
        self.duration = registry.histogram(
            "faas.invoke_duration", "Time on the node, from receipt to answer", (*labels, "faas.coldstart")
        )
        self.init = registry.histogram(
            "faas.init_duration",
            "A cold start's getting ready (instance or program)",
            (*labels, "hetfaas.pool_mode"),
        )
        self.coldstarts = registry.counter(
            "faas.coldstarts", "Cold starts", (*labels, "hetfaas.pool_mode"), unit="{coldstart}"
        )
        self.invocations = registry.counter(
            "faas.invocations", "Invocations answered, whatever their outcome", labels, unit="{invocation}"
        )
        self.errors = registry.counter(
            "faas.errors",
            "Invocations answered with an error, by its code",
            (*labels, "error.type"),
            "{error}",
        )
        self.timeouts = registry.counter(
            "faas.timeouts", "Invocations that ran out of time", labels, unit="{timeout}"
        )
        self.recent = RecentInvocations(node_id)

    def ended(self, req: NodeInvoke, reply: InvokeReply | ErrorReply, span: Any, mode: str) -> None:
        """An invocation's end in the metrics and on its node span (a Span, a deferred one, or a
        no-op): a cold start or a failure keeps a deferred trace."""
        telemetry.ended(span, reply)
        labels = (req.spec.name, req.spec.tenant)
        self.invocations.add(labels)
        self.recent.add(req, reply)
        if isinstance(reply, ErrorReply):
            code = reply.error.code
            self.errors.add((*labels, code))
            if code == "timeout":
                self.timeouts.add(labels)
            return
        span.set_attribute("faas.coldstart", reply.cold_start)
        if reply.start_path:
            span.set_attribute("hetfaas.start_path", reply.start_path)
        phases = reply.phases_ms
        self.observe(req, reply, mode, phases.get("acquire_ms") or phases.get("program_load_ms"))

    def observe(self, req: NodeInvoke, reply: InvokeReply, mode: str, init_ms: float | None) -> None:
        name, tenant = req.spec.name, req.spec.tenant
        self.duration.record(
            (name, tenant, "true" if reply.cold_start else "false"), reply.duration_ms / 1000
        )
        if reply.cold_start:
            self.coldstarts.add((name, tenant, mode))
            if init_ms is not None:
                self.init.record((name, tenant, mode), init_ms / 1000)


def answer(req: NodeInvoke, reply: InvokeReply | ErrorReply) -> InvokeReply | ErrorReply | bus.ReplyTo:
    """Straight to the caller when the scheduler asked for it, except refusals it retries elsewhere."""
    if req.reply_to and not (isinstance(reply, ErrorReply) and reply.error.code in RETRIED_ELSEWHERE):
        return bus.ReplyTo(req.reply_to, reply, batch_ack=req.batch_acks, keep_trace=telemetry.keeps(reply))
    return reply


def run_key(req: NodeInvoke | WhereIs) -> str:
    """What a node runs once: an invocation id of one tenant's function. (Keyed by the id alone,
    a copy carrying another tenant's id would get that tenant's answer.) Names hold no "/"."""
    if isinstance(req, WhereIs):
        return f"{req.tenant}/{req.function}/{req.invocation_id}"
    return f"{req.spec.tenant}/{req.spec.name}/{req.invocation_id}"


class Once:
    """Each invocation (`run_key`) runs at most once on this node. A caller that heard nothing sends its
    invocation again (its scheduler may have died after forwarding it), and the new scheduler
    finds it here through `where_is`: a copy that arrives while the first runs waits for the
    first's answer; one that arrives later gets the answer again. Refusals (throttled,
    unavailable) are forgotten at once: nothing ran, so a later copy may run."""

    def __init__(self, node_id: str, keep: int = 10_000):
        self.node_id = node_id
        self._keep = keep
        self._answers: OrderedDict[str, asyncio.Future[InvokeReply | ErrorReply]] = OrderedDict()
        self.joined = 0  # copies answered from another's run

    async def run(
        self, invocation_id: str, work: Callable[[], Awaitable[InvokeReply | ErrorReply]]
    ) -> InvokeReply | ErrorReply:
        first = self._answers.get(invocation_id)
        if first is not None:
            self.joined += 1
            return await asyncio.shield(first)
        answer: asyncio.Future[InvokeReply | ErrorReply] = asyncio.get_running_loop().create_future()
        self._answers[invocation_id] = answer
        try:
            reply = await work()
        except BaseException:
            del self._answers[invocation_id]
            answer.cancel()
            raise
        self.settle(invocation_id, answer, reply)
        return reply

    def has(self, invocation_id: str) -> bool:
        return invocation_id in self._answers

    def remember(self, invocation_id: str, reply: InvokeReply | ErrorReply) -> None:
        """An invocation run without `run` (a node's fast path, which ran it without waiting):
        copies find its answer as they would have."""
        self.settle(invocation_id, self.begin(invocation_id), reply)

    def begin(self, invocation_id: str) -> "asyncio.Future[InvokeReply | ErrorReply]":
        """An invocation starts without `run` (a node's fast path, answered by callback): copies
        that come meanwhile wait for what `settle` gives its future."""
        answer: asyncio.Future[InvokeReply | ErrorReply] = asyncio.get_running_loop().create_future()
        self._answers[invocation_id] = answer
        return answer

    def settle(
        self,
        invocation_id: str,
        answer: "asyncio.Future[InvokeReply | ErrorReply]",
        reply: InvokeReply | ErrorReply,
    ) -> None:
        answer.set_result(reply)
        if isinstance(reply, ErrorReply) and reply.error.code in RETRIED_ELSEWHERE:
            del self._answers[invocation_id]
        while len(self._answers) > self._keep:
            oldest, future = next(iter(self._answers.items()))
            if not future.done():
                break  # the oldest still runs: keep it (and, for now, the rest)
            del self._answers[oldest]

    async def where_is(self, req: WhereIs, ctx: bus.Context) -> HaveIt:
        """Whether this node has the invocation: every node answers, so that the asking
        scheduler need not wait out its deadline to learn that none has it."""
        answer = self._answers.get(run_key(req))
        if answer is None:
            return HaveIt(node_id=self.node_id, done=False, has=False)
        return HaveIt(node_id=self.node_id, done=answer.done())

    def route(self) -> bus.Route:
        return bus.Route(subjects.WHERE_IS, codec.where_is, self.where_is)
