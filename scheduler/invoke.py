"""The invoke path of one scheduler replica: the fast path, admission (through gate.py), placement
of each attempt, forwarding to the chosen node with a deadline, and retrying elsewhere while the
deadline allows."""

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import msgspec

from fabric import bus, telemetry
from fabric.connection import Connection
from fabric.tasks import TaskSet
from fabric.tracing import Unsampled, Within
from scheduler import framework, keepalive, plugins, shares
from scheduler.gate import CAPACITY, AdmissionGate
from scheduler.metrics import SchedulerMetrics
from scheduler.settings import SchedulerSettings
from scheduler.view import ClusterView, warm_key
from scheduler.where_is import REPLICA_PREFIX, SILENT, where_is
from schemas import codec, subjects
from schemas.errors import RETRIED_ELSEWHERE
from schemas.messages import (
    ErrorReply,
    FunctionRecord,
    HaveIt,
    InvokeRequest,
    NodeInvoke,
    WhereIs,
    error_reply,
)

log = logging.getLogger(__name__)

SERVER, CLIENT = telemetry.SpanKind.SERVER, telemetry.SpanKind.CLIENT


# msgspec writes a tagged struct's tag first, so an encoded ErrorReply starts with a map header and
# then exactly these bytes: the scheduler can spot a node's error without decoding every reply.
_ERROR_TAG = msgspec.msgpack.encode({"type": "error"})[1:]


def is_error_reply(data: bytes) -> bool:
    return data[1 : 1 + len(_ERROR_TAG)] == _ERROR_TAG


class TryElsewhere(Exception):
    """This attempt failed in a way another node may not (gone, unreachable, full)."""


class Attempts(msgspec.Struct):
    """One invocation's tries so far."""

    prefer: str | None = None  # the node that has it already (a caller's resend)
    tried: set[str] = set()
    failures: list[str] = []
    woken: bool = False  # it waited its turn and was woken: it keeps its place in the queue


class Flight(msgspec.Struct):
    """An invocation taken by the fast path (`Invoker.try_now`), while its node has it."""

    req: InvokeRequest
    record: FunctionRecord
    ctx: bus.Context
    key: str  # its warm-instance key
    deadline: float  # loop time by which the caller must have its answer
    keep_alive: tuple[int, int]  # (keep_alive_ms, prewarm_after_ms) for the node
    span: Any  # its scheduler.invoke span (None when tracing is off)


def invoke_attributes(req: InvokeRequest) -> dict[str, Any]:
    """The scheduler.invoke span's attributes."""
    return {
        "faas.invocation_id": req.invocation_id,
        "faas.name": req.function,
        "faas.trigger": trigger_of(req),
        "hetfaas.tenant": req.tenant,
        "hetfaas.attempt": req.attempt,
    }


FAAS_TRIGGERS = frozenset({"datasource", "http", "pubsub", "timer", "other"})  # the semantic conventions


def trigger_of(req: InvokeRequest) -> str:
    """The caller's trigger if the conventions name it, else "other" (a caller's word, bounded)."""
    return req.trigger if req.trigger in FAAS_TRIGGERS else "other"


def recording_or_deferred(span: object) -> bool:
    """Whether a span may be exported (sampled, or deferred: kept if the node starts cold),
    so that its attempt is worth the placement's explanation."""
    return span is not None and not isinstance(span, Unsampled)


def attempt_attributes(node_id: str, attempt: int, why: "str | Explanation") -> dict[str, Any]:
    """The scheduler.attempt span's attributes (the placement's reasons written out on export)."""
    return {"hetfaas.node": node_id, "hetfaas.attempt": attempt, "hetfaas.placement": why}


def removed_meanwhile(view: ClusterView, req: InvokeRequest, record: FunctionRecord) -> ErrorReply | None:
    """not_found for an invocation whose function was removed while it waited its turn: a
    removed function runs nothing more. (Known by the view: the record it was admitted
    with was in the view, and the view no longer has the function.)"""
    current = view.functions.get((req.tenant, req.function))
    removed = (req.tenant, req.function, record.deployed_at)
    if current is not None or removed not in view.removed_deployments:
        return None
    why = f"function {req.function!r} was removed while the invocation waited its turn"
    return error_reply("not_found", why, req.invocation_id)


class Invoker:
    def __init__(
        self,
        settings: SchedulerSettings,
        nc: Connection,
        view: ClusterView,
        requester: bus.Requester,
        replicas: Callable[[], shares.Replicas],
        tenant_limit: Callable[[str], int],
        tenant_weight: Callable[[str], int],
    ):
        self.settings = settings
        self._nc = nc
        self._view = view
        self._requester = requester
        self._replicas = replicas
        self._profile = plugins.profile(settings.placement)
        self.gate = AdmissionGate(settings, nc, replicas, tenant_limit, tenant_weight)
        self.counters = self.gate.counters
        self.metrics = SchedulerMetrics()
        # invocation id -> the reply subject of the copy this replica is handling
        self._handling: dict[str, str] = {}
        self.arrivals = keepalive.ArrivalBook(settings.keep_alive)
        self.tasks = TaskSet()  # retries of invocations the fast path took

    def try_now(self, req: InvokeRequest, record: FunctionRecord, ctx: bus.Context) -> bool:
        """The fast path. An invocation that need not wait for anything (a first attempt, within
        its limits with nobody queued ahead, a node with room) is forwarded as it is read, and
        its node's acknowledgement taken by callback: no task, no chain of coroutines held open
        while the node runs it. Anything else is left to `invoke` (False); so is a failed
        attempt's retry, which goes on in a task (`_retry`)."""
        if req.attempt > 1 or req.invocation_id in self._handling or not self.gate.may_start_now(req, record):
            return False
        span = None
        if telemetry.enabled():
            attributes = invoke_attributes(req)
            span = telemetry.open_span(
                "scheduler.invoke", parent=ctx.headers, kind=SERVER, attributes=attributes, deferrable=True
            )
        key, now = warm_key(record), time.monotonic()
        decision, _ = self._place(req, record, key, set(), now, explain=recording_or_deferred(span))
        if not isinstance(decision, framework.Placed):
            return False  # the span was never finished: nothing of it is exported
        deadline = ctx.received_at + (req.timeout_ms - self.settings.reply_margin_ms) / 1000
        flight = Flight(req, record, ctx, key, deadline, self._keep_alive(req, record), span)
        self._handling[req.invocation_id] = ctx.reply  # from here on, `_finish` undoes these
        self.gate.enter((req.tenant, req.function))
        self.metrics.admitted(req.tenant, now - ctx.received_at)
        self._send_first(flight, decision.node_id, Explanation(decision), now)
        return True

    def _send_first(self, flight: Flight, node_id: str, why: "Explanation", now: float) -> None:
        req, reply_to = flight.req, flight.ctx.reply
        message = self._node_invoke(
            req, flight.record, node_id, flight.deadline, now, 1, flight.keep_alive, reply_to
        )
        span = None
        if flight.span is not None:
            with Within(flight.span):
                traced = attempt_attributes(node_id, 1, why)
                span = telemetry.open_span("scheduler.attempt", kind=CLIENT, attributes=traced)
        self._view.reserve(node_id, flight.key)
        answered = partial(self._answered, flight, node_id, span)
        try:
            subject, timeout_s = subjects.node_invoke(node_id), message.timeout_ms / 1000
            self._requester.send(  # a copy is answered by the node from the first (Once)
                subject,
                codec.encode(message),
                timeout_s,
                telemetry.headers_of(span),
                node_id,
                answered,
                idempotent=True,
            )
        except Exception as exc:  # not sent (the connection is closing): nothing runs it
            self._release_node(node_id, flight.key)
            telemetry.close_span(span, str(exc))
            why_not = f"internal error: could not send to {node_id}: {exc}"
            self._finish(flight, error_reply("internal", why_not, flight.req.invocation_id))

    def _answered(self, flight: Flight, node_id: str, span: Any, outcome: bytes | BaseException) -> None:
        if outcome == bus.TRACE_KEPT and span is not None:
            span.keep()
        try:
            reply = self._outcome(node_id, flight.key, flight.req.invocation_id, outcome)
        except TryElsewhere as exc:
            telemetry.close_span(span, str(exc))
            attempts = Attempts(tried={node_id}, failures=[str(exc)])
            self.tasks.spawn(self._retry(flight, attempts), f"retry-{flight.req.invocation_id}")
            return
        except Exception as exc:  # a malformed answer from the node: as bus.dispatch answers one
            log.exception("the answer from %s to invocation %s", node_id, flight.req.invocation_id)
            telemetry.close_span(span, str(exc))
            self._finish(flight, bus.internal_error(exc, flight.req.invocation_id))
            return
        telemetry.close_span(span)
        self._finish(flight, reply)

    async def _retry(self, flight: Flight, attempts: "Attempts") -> None:
        """A fast-path invocation whose first node failed it: on through `invoke`'s retry loop."""
        req, ctx = flight.req, flight.ctx
        reply: ErrorReply | bytes | None = None
        try:
            with Within(flight.span):
                wait_until = self.gate.wait_until(ctx, flight.deadline)
                reply = await self._place_and_forward(
                    req, flight.record, flight.deadline, wait_until, ctx.reply, attempts, flight.keep_alive
                )
        except Exception as exc:  # as a handler's failure is answered (bus.dispatch)
            log.exception("retrying invocation %s failed", req.invocation_id)
            reply = bus.internal_error(exc, req.invocation_id)
        finally:
            self._finish(flight, reply)

    def _finish(self, flight: Flight, reply: ErrorReply | bytes | None) -> None:
        """What `invoke` does on the way out, and the server's answer."""
        req = flight.req
        self.gate.leave((req.tenant, req.function))
        self._stop_handling(req.invocation_id, flight.ctx.reply)
        self.metrics.answered(reply)
        bus.answer(self._nc, reply, flight.ctx)
        if flight.span is not None:
            if isinstance(reply, ErrorReply):
                flight.span.set_attribute("hetfaas.error", reply.error.code)
                flight.span.keep()
            telemetry.close_span(flight.span)

    def is_resent(self, req: InvokeRequest, reply: str) -> bool:
        """A caller's copy of an invocation this replica is still handling, to the same reply
        subject: dropped, since the first copy's answer goes there. A copy with a reply of its own
        (each copy from a tenant's account gets one from the server, and the first's may be gone
        with a connection the server closed) is handled as another replica would: where-is finds
        the node, which answers every copy."""
        if self._handling.get(req.invocation_id) != reply:
            return False
        self.counters.resent += 1
        return True

    def _stop_handling(self, invocation_id: str, reply: str) -> None:
        if self._handling.get(invocation_id) == reply:
            del self._handling[invocation_id]

    async def invoke(
        self, req: InvokeRequest, record: FunctionRecord, ctx: bus.Context
    ) -> ErrorReply | bytes | None:
        """The answer to relay; None when the caller gets it from someone else (the node, another
        replica, or the first copy of a request the caller sent again)."""
        if self.is_resent(req, ctx.reply):
            return None
        self._handling[req.invocation_id] = ctx.reply
        try:
            deadline = ctx.received_at + (req.timeout_ms - self.settings.reply_margin_ms) / 1000
            admitted = await self.gate.admit(req, record, deadline, ctx)
            if admitted != "admitted":
                return None if admitted == "handed_over" else admitted
            self.metrics.admitted(req.tenant, time.monotonic() - ctx.received_at)
            if (removed := removed_meanwhile(self._view, req, record)) is not None:
                self.gate.leave((req.tenant, req.function))
                return removed
            try:
                wait_until = self.gate.wait_until(ctx, deadline)
                return await self._place_and_forward(req, record, deadline, wait_until, ctx.reply)
            finally:
                self.gate.leave((req.tenant, req.function))
        finally:
            self._stop_handling(req.invocation_id, ctx.reply)

    async def _place_and_forward(
        self,
        req: InvokeRequest,
        record: FunctionRecord,
        deadline: float,
        wait_until: float,
        reply_to: str,
        attempts: "Attempts | None" = None,
        keep_alive: tuple[int, int] | None = None,
    ) -> ErrorReply | bytes | None:
        """Try nodes until one answers or the deadline passes. None: the node answered the caller.
        `attempts` and `keep_alive`: what a fast-path invocation's first attempt had already."""
        key = warm_key(record)
        keep_alive = keep_alive or self._keep_alive(req, record)
        if attempts is None:
            prefer = await self._where_is(req) if req.attempt > 1 else None
            if prefer is not None and (prefer == SILENT or prefer.startswith(REPLICA_PREFIX)):
                # another replica still has the first copy (it answers the caller), or a node that
                # may have it said nothing: not placed again (the caller's next copy asks again)
                return None
            attempts = Attempts(prefer=prefer)
        while True:
            now = time.monotonic()
            if now >= deadline:
                why = "; ".join(attempts.failures) or "no node had room"
                return error_reply(
                    "timeout", f"deadline passed before {req.function!r} could run ({why})", req.invocation_id
                )
            choice = await self._next_node(req, record, key, attempts, now, wait_until, deadline)
            if isinstance(choice, ErrorReply):
                return choice
            if choice is None:
                if (removed := removed_meanwhile(self._view, req, record)) is not None:
                    return removed
                continue  # waited for room: look again
            node_id, why_here = choice
            attempts.tried.add(node_id)
            attempt = len(attempts.tried) + req.attempt - 1
            message = self._node_invoke(req, record, node_id, deadline, now, attempt, keep_alive, reply_to)
            try:
                if not telemetry.enabled():
                    return await self._forward(node_id, message, key)
                return await self._traced_forward(node_id, message, key, why_here)
            except TryElsewhere as exc:
                attempts.failures.append(str(exc))

    def _node_invoke(
        self,
        req: InvokeRequest,
        record: FunctionRecord,
        node_id: str,
        deadline: float,
        now: float,
        attempt: int,
        keep_alive: tuple[int, int],
        reply_to: str,
    ) -> NodeInvoke:
        return NodeInvoke(
            invocation_id=req.invocation_id,
            spec=record.spec,
            bundle_digest=record.bundle_digest,
            program_digest=record.program_digest,
            layer_digest=record.layer_digest,
            payload=req.payload,
            timeout_ms=int((deadline - now) * 1000),
            attempt=attempt,
            reply_to=reply_to,
            batch_acks=True,
            keep_alive_ms=keep_alive[0],
            prewarm_after_ms=keep_alive[1],
            trigger=trigger_of(req),
            deployed_at=record.deployed_at,
        )

    async def _traced_forward(
        self, node_id: str, message: NodeInvoke, key: str, why_here: "str | Explanation"
    ) -> ErrorReply | bytes | None:
        """`_forward` in a span of its own: a retry is the failed attempt's sibling."""
        traced = attempt_attributes(node_id, message.attempt, why_here)
        with telemetry.span("scheduler.attempt", kind=CLIENT, attributes=traced) as span:
            try:
                return await self._forward(node_id, message, key)
            except TryElsewhere as exc:
                span.set_error(str(exc))
                raise

    async def _next_node(
        self,
        req: InvokeRequest,
        record: FunctionRecord,
        key: str,
        attempts: "Attempts",
        now: float,
        wait_until: float,
        deadline: float,
    ) -> tuple[str, "str | Explanation"] | ErrorReply | None:
        """(node, why it) for the next attempt; an error to answer with; or None after waiting
        for room (the caller looks again)."""
        if attempts.prefer and not attempts.tried:
            return attempts.prefer, "a node had this invocation already (the caller sent it again)"
        if not attempts.woken and self.gate.capacity.waiting():
            # Others wait for room already: queue behind them rather than take the slot the
            # next of them was woken for.
            why = "earlier invocations wait for room"
            refusal = await self.gate.wait(req, CAPACITY, wait_until, deadline, why)
            attempts.woken = True
            return refusal
        decision, total = self._place(req, record, key, attempts.tried, now, telemetry.current() is not None)
        if isinstance(decision, framework.Placed):
            return decision.node_id, Explanation(decision)
        why = "; ".join([*attempts.failures, decision.explain(total)])
        if not decision.wait:
            return error_reply("unavailable", f"no node can run {req.function!r}: {why}", req.invocation_id)
        busy = f"every fitting node is busy ({why})"
        refusal = await self.gate.wait(req, CAPACITY, wait_until, deadline, busy, front=attempts.woken)
        attempts.woken = True
        return refusal

    def _place(
        self, req: InvokeRequest, record: FunctionRecord, key: str, tried: set[str], now: float, explain: bool
    ) -> tuple[framework.Placed | framework.Unplaced, int]:
        """The decision, and how many healthy nodes it chose from; `explain`: with its reasons,
        for a span that records them."""
        settings = self.settings
        snapshot = self._view.snapshot(
            now, settings.node_stale_after_s, settings.placement.snapshot_refresh_ms / 1000
        )
        replicas = self._replicas()
        spec = record.spec
        request = framework.Request(
            key=key,
            tenant=spec.tenant,
            runtime=spec.runtime,
            placement=spec.placement,
            memory_mb=spec.memory_mb,
            map_memory_bytes=record.map_memory_bytes,
            program_key=record.program_key,
            instances=spec.concurrency if spec.runtime == "python" else 0,
            salt=hash(req.invocation_id) & 0xFFFFFFFF,
            exclude=frozenset(tried),
        )
        view = self._view
        pack_below = settings.placement.pack_below_utilisation
        cycle = framework.Cycle(snapshot, view.held, view.held_instances, replicas.share, "", pack_below)
        decision = framework.place(request, snapshot, self._profile, cycle, explain=explain)
        return decision, snapshot.size

    async def _forward(self, node_id: str, message: NodeInvoke, key: str) -> ErrorReply | bytes | None:
        """One attempt on one node: the reply to relay, None when the node answered the caller
        itself, or TryElsewhere."""
        self._view.reserve(node_id, key)
        outcome: bytes | BaseException
        try:
            outcome = await self._requester.request(
                subjects.node_invoke(node_id),
                codec.encode(message),
                message.timeout_ms / 1000,
                telemetry.trace_headers(),
                node_id,
                idempotent=True,  # a copy is answered by the node from the first (Once)
            )
        except (bus.NoResponders, bus.PeerLost, bus.RequestTimeout) as exc:
            outcome = exc
        except BaseException:
            self._release_node(node_id, key)
            raise
        if outcome == bus.TRACE_KEPT:
            telemetry.keep_current()  # the attempt's span, and the invocation's above it
        return self._outcome(node_id, key, message.invocation_id, outcome)

    def _release_node(self, node_id: str, key: str) -> None:
        self._view.unreserve(node_id, key)
        self.gate.capacity.wake()

    def _outcome(
        self, node_id: str, key: str, invocation_id: str, outcome: bytes | BaseException
    ) -> ErrorReply | bytes | None:
        """An attempt's end, as the node's answer (or the lack of one) says: the reply to relay,
        None when the node answered the caller itself, or TryElsewhere."""
        self._release_node(node_id, key)
        if isinstance(outcome, bus.NoResponders):
            self._view.unreachable(node_id)
            raise TryElsewhere(f"{node_id} is not listening")
        if isinstance(outcome, bus.PeerLost):
            # It may have run there: sent again elsewhere it could run twice. At most once, as
            # a synchronous invocation is everywhere (the caller decides whether to retry).
            why = f"{node_id} was lost while it had the invocation: it may have run, so it is not run again"
            return error_reply("unavailable", why, invocation_id, node_id)
        if isinstance(outcome, bus.RequestTimeout):
            return error_reply(
                "timeout", f"{node_id} did not answer before the deadline", invocation_id, node_id
            )
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome == bus.TRACE_KEPT:  # the node answered the caller, and kept the trace
            self._view.ran(node_id, key)
            return None
        if is_error_reply(outcome):
            result = codec.invoke_result.decode(outcome)
            if result.error.code in RETRIED_ELSEWHERE:
                raise TryElsewhere(f"{node_id}: {result.error.message}")
        self._view.ran(node_id, key)
        # An empty acknowledgement: the node answered the caller itself. Otherwise relay the
        # reply as the node encoded it (no decoding or re-encoding on the hot path).
        return outcome or None

    async def _where_is(self, req: InvokeRequest) -> str | None:
        """The node, or the other replica, that has this invocation already (the caller sent it
        again), if any."""
        settings = self.settings
        timeout_s = settings.where_is_timeout_ms / 1000
        stale_after_s = settings.node_stale_after_s
        asked = WhereIs(invocation_id=req.invocation_id, tenant=req.tenant, function=req.function)
        live = self._replicas()
        others = {REPLICA_PREFIX + rid for rid in live.beating if rid != live.me}
        return await where_is(self._nc, self._view, asked, req.attempt, stale_after_s, timeout_s, others)

    def has_it(self, req: WhereIs) -> HaveIt:
        """Whether this replica still handles the invocation (queued, placing, or forwarded)."""
        return HaveIt(
            node_id=REPLICA_PREFIX + self.settings.scheduler_id,
            done=False,
            has=req.invocation_id in self._handling,
        )

    def _keep_alive(self, req: InvokeRequest, record: FunctionRecord) -> tuple[int, int]:
        """(keep_alive_ms, prewarm_after_ms) for the node, from this function's arrivals."""
        if not self.settings.keep_alive.enabled or record.spec.runtime == "ebpf":
            return 0, 0
        return self.arrivals.arrived((req.tenant, req.function), time.time())


class Explanation:
    """Why this node, for the trace: each score and how many nodes were looked at (empty when
    the decision was made without explaining, i.e. tracing is off). Written out only when the
    span is exported, on the exporter's thread, not on the invoke path."""

    __slots__ = ("decision",)

    def __init__(self, decision: framework.Placed):
        self.decision = decision

    def __str__(self) -> str:
        decision = self.decision
        if not decision.scores:
            return ""
        scores = ", ".join(f"{name} {value:.0f}" for name, value in decision.scores.items())
        return f"{scores} (of {decision.considered} looked at)"
