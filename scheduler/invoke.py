"""The invoke path of one scheduler replica: admission (limits and the wait queue), placement,
forwarding to the chosen node with a deadline, and retrying elsewhere while the deadline allows."""

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import msgspec

from fabric import bus, nodes, telemetry
from fabric.connection import STATUS, Connection
from fabric.tasks import TaskSet
from fabric.tracing import Span, Within
from scheduler import framework, keepalive, plugins, shares
from scheduler.admission import Blocked, FunctionKey, Running, decrement, increment
from scheduler.settings import SchedulerSettings
from scheduler.view import ClusterView, warm_key
from scheduler.waiting import QueueFull, WaitQueue
from schemas import codec, subjects
from schemas.errors import Error, ErrorCode
from schemas.messages import ErrorReply, FunctionRecord, InvokeRequest, NodeInvoke, WhereIs

log = logging.getLogger(__name__)

SERVER, CLIENT = telemetry.SpanKind.SERVER, telemetry.SpanKind.CLIENT
CAPACITY = ("capacity",)  # the wait-queue reason of invocations waiting for room on a node
MAX_ARRIVAL_HISTORIES = 100_000


# msgspec writes a tagged struct's tag first, so an encoded ErrorReply starts with a map header and
# then exactly these bytes: the scheduler can spot a node's error without decoding every reply.
_ERROR_TAG = msgspec.msgpack.encode({"type": "error"})[1:]


def is_error_reply(data: bytes) -> bool:
    return data[1 : 1 + len(_ERROR_TAG)] == _ERROR_TAG


def error(code: ErrorCode, message: str, invocation_id: str = "", node: str = "") -> ErrorReply:
    return ErrorReply(error=Error(code=code, message=message), invocation_id=invocation_id, node=node)


class TryElsewhere(Exception):
    """This attempt failed in a way another node may not (gone, unreachable, full)."""


@dataclass
class Counters:
    throttled: int = 0  # turned away: queue full, or waited its longest
    handed_over: int = 0  # sent to a replica holding a share of a limit this one has none of
    resent: int = 0  # a caller's resend of an invocation this replica is still handling: dropped


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
        "faas.trigger": req.trigger,
        "hetfaas.tenant": req.tenant,
        "hetfaas.attempt": req.attempt,
    }


def attempt_attributes(node_id: str, attempt: int, why: "str | Explanation") -> dict[str, Any]:
    """The scheduler.attempt span's attributes (the placement's reasons written out on export)."""
    return {"hetfaas.node": node_id, "hetfaas.attempt": attempt, "hetfaas.placement": why}


class Invoker:
    def __init__(
        self,
        settings: SchedulerSettings,
        nc: Connection,
        view: ClusterView,
        requester: bus.Requester,
        replicas: Callable[[], shares.Replicas],
        tenant_limit: Callable[[str], int],
    ):
        self.settings = settings
        self._nc = nc
        self._view = view
        self._requester = requester
        self._replicas = replicas
        self._tenant_limit = tenant_limit
        self._profile = plugins.profile(settings.placement)
        self.running = Running()
        self.queue = WaitQueue(settings.admission.max_queue)
        self.counters = Counters()
        self._handling: set[str] = set()
        self._arrivals: dict[FunctionKey, keepalive.Arrivals] = {}
        self.fresh_arrivals: dict[FunctionKey, float] = {}  # told to the other replicas at the next beat
        self.tasks = TaskSet()  # retries of invocations the fast path took

    def try_now(self, req: InvokeRequest, record: FunctionRecord, ctx: bus.Context) -> bool:
        """The fast path. An invocation that need not wait for anything (a first attempt, within
        its limits with nobody queued ahead, a node with room) is forwarded as it is read, and
        its node's acknowledgement taken by callback: no task, no chain of coroutines held open
        while the node runs it. Anything else is left to `invoke` (False); so is a failed
        attempt's retry, which goes on in a task (`_retry`)."""
        if req.attempt > 1 or req.invocation_id in self._handling or self.queue.waiting(CAPACITY):
            return False
        fn: FunctionKey = (req.tenant, req.function)
        fn_limit, tenant_limit = self._shares(req, record)
        if fn_limit == 0 or tenant_limit == 0 or self.running.blocked(fn, fn_limit, tenant_limit):
            return False
        if self._queued_ahead(fn, fn_limit, tenant_limit):
            return False
        span = None
        if telemetry.enabled():
            attributes = invoke_attributes(req)
            span = telemetry.open_span(
                "scheduler.invoke", parent=ctx.headers, kind=SERVER, attributes=attributes
            )
        key, now = warm_key(record), time.monotonic()
        decision, _ = self._place(req, record, key, set(), now, explain=isinstance(span, Span))
        if not isinstance(decision, framework.Placed):
            return False  # the span was never finished: nothing of it is exported
        deadline = ctx.received_at + (req.timeout_ms - self.settings.reply_margin_ms) / 1000
        flight = Flight(req, record, ctx, key, deadline, self._keep_alive(req, record), span)
        self._handling.add(req.invocation_id)  # from here on, `_finish` undoes these
        self.running.enter(fn)
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
        self._hold(node_id, flight.key)
        answered = partial(self._answered, flight, node_id, span)
        try:
            subject, timeout_s = subjects.node_invoke(node_id), message.timeout_ms / 1000
            self._requester.send(
                subject, codec.encode(message), timeout_s, telemetry.headers_of(span), node_id, answered
            )
        except Exception as exc:  # not sent (the connection is closing): nothing runs it
            self._release_node(node_id, flight.key)
            telemetry.close_span(span, str(exc))
            why_not = f"internal error: could not send to {node_id}: {exc}"
            self._finish(flight, error("internal", why_not, flight.req.invocation_id))

    def _answered(self, flight: Flight, node_id: str, span: Any, outcome: bytes | BaseException) -> None:
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
                wait_until = self._wait_until(ctx, flight.deadline)
                reply = await self._place_and_forward(
                    req, flight.record, flight.deadline, wait_until, ctx.reply, attempts, flight.keep_alive
                )
        except Exception as exc:  # as a handler's failure is answered (bus.dispatch)
            log.exception("retrying invocation %s failed", req.invocation_id)
            reply = bus.internal_error(exc, req.invocation_id)
        finally:
            self._finish(flight, reply)

    def _finish(self, flight: Flight, reply: ErrorReply | bytes | None) -> None:
        """What `invoke` and `_admit` do on the way out, and the server's answer."""
        req = flight.req
        self._leave((req.tenant, req.function))
        self._handling.discard(req.invocation_id)
        bus.answer(self._nc, reply, flight.ctx)
        if flight.span is not None:
            if isinstance(reply, ErrorReply):
                flight.span.set_attribute("hetfaas.error", reply.error.code)
            telemetry.close_span(flight.span)

    def is_resent(self, req: InvokeRequest) -> bool:
        """A caller's copy of an invocation this replica is still handling: dropped, since the
        first copy's answer goes to the same inbox."""
        if req.invocation_id not in self._handling:
            return False
        self.counters.resent += 1
        return True

    async def invoke(
        self, req: InvokeRequest, record: FunctionRecord, ctx: bus.Context
    ) -> ErrorReply | bytes | None:
        """The answer to relay; None when the caller gets it from someone else (the node, another
        replica, or the first copy of a request the caller sent again)."""
        if self.is_resent(req):
            return None
        self._handling.add(req.invocation_id)
        try:
            deadline = ctx.received_at + (req.timeout_ms - self.settings.reply_margin_ms) / 1000
            return await self._admit(req, record, deadline, ctx)
        finally:
            self._handling.discard(req.invocation_id)

    async def _admit(
        self, req: InvokeRequest, record: FunctionRecord, deadline: float, ctx: bus.Context
    ) -> ErrorReply | bytes | None:
        fn: FunctionKey = (req.tenant, req.function)
        fn_limit, tenant_limit = self._shares(req, record)
        if fn_limit == 0 or tenant_limit == 0:
            owner = self._owner(req, record, fn_limit == 0)
            if owner is not None and not subjects.is_replica_invoke(ctx.subject):
                await self._hand_over(req, owner, ctx)
                return None  # the owner answers the caller
            # handed to us already, or no live owner: serve it, one at a time
            fn_limit, tenant_limit = fn_limit if fn_limit != 0 else 1, tenant_limit or 1
        wait_until = self._wait_until(ctx, deadline)
        refusal = await self._wait_for_limits(req, fn, fn_limit, tenant_limit, wait_until, deadline)
        if refusal is not None:
            return refusal
        self.running.enter(fn)
        try:
            return await self._place_and_forward(req, record, deadline, wait_until, ctx.reply)
        finally:
            self._leave(fn)

    def _shares(self, req: InvokeRequest, record: FunctionRecord) -> tuple[int | None, int]:
        """This replica's shares of the function's limit (None: it has none) and the tenant's."""
        replicas = self._replicas()
        fn_total = record.spec.max_concurrency
        fn_limit = replicas.share(fn_total, f"{req.tenant}/{req.function}") if fn_total else None
        return fn_limit, replicas.share(self._tenant_limit(req.tenant), req.tenant)

    def _owner(self, req: InvokeRequest, record: FunctionRecord, of_function: bool) -> str | None:
        """The replica holding a share of the function's (or else the tenant's) limit."""
        replicas = self._replicas()
        if of_function:
            return replicas.owner(record.spec.max_concurrency, f"{req.tenant}/{req.function}")
        return replicas.owner(self._tenant_limit(req.tenant), req.tenant)

    def _wait_until(self, ctx: bus.Context, deadline: float) -> float:
        """The longest an invocation may wait in the queue."""
        return min(deadline, ctx.received_at + self.settings.admission.max_queue_wait_ms / 1000)

    def _leave(self, fn: FunctionKey) -> None:
        """An admitted invocation is done: the next waiting on its limits may go."""
        self.running.leave(fn)
        self.queue.wake(("function", f"{fn[0]}/{fn[1]}"))
        self.queue.wake(("tenant", fn[0]))

    async def _wait_for_limits(
        self,
        req: InvokeRequest,
        fn: FunctionKey,
        fn_limit: int | None,
        tenant_limit: int,
        wait_until: float,
        deadline: float,
    ) -> ErrorReply | None:
        """Wait (FIFO) until neither limit stops `fn`. A newcomer queues behind invocations
        already waiting on the same limit instead of taking the slot one of them was woken for."""
        woken = False
        while True:
            blocked = self.running.blocked(fn, fn_limit, tenant_limit)
            if blocked is None and not woken:
                blocked = self._queued_ahead(fn, fn_limit, tenant_limit)
            if blocked is None:
                return None
            reason = (blocked.scope, blocked.name)
            refusal = await self._wait(req, reason, wait_until, deadline, blocked, front=woken)
            if refusal is not None:
                return refusal
            woken = True

    def _queued_ahead(self, fn: FunctionKey, fn_limit: int | None, tenant_limit: int) -> Blocked | None:
        name = f"{fn[0]}/{fn[1]}"
        if fn_limit is not None and self.queue.waiting(("function", name)):
            return Blocked("function", name, fn_limit)
        if self.queue.waiting(("tenant", fn[0])):
            return Blocked("tenant", fn[0], tenant_limit)
        return None

    async def _wait(
        self,
        req: InvokeRequest,
        reason: tuple[str, ...],
        wait_until: float,
        deadline: float,
        why: Blocked | str,
        front: bool = False,
    ) -> ErrorReply | None:
        """Queue until woken (None) or refuse: throttled when the queue is full or the wait too long.
        `front`: woken before but beaten to the slot, it keeps its turn."""
        what = why.describe() if isinstance(why, Blocked) else why
        started_ns = time.time_ns()
        try:
            woken = await self.queue.wait(reason, wait_until - time.monotonic(), front)
            telemetry.record("scheduler.queue", started_ns, time.time_ns(), {"hetfaas.waited_for": what})
            if woken:
                return None
        except QueueFull as exc:
            self.counters.throttled += 1
            return error("throttled", f"{what}, and {exc}", req.invocation_id)
        if wait_until >= deadline:
            return error("timeout", f"{what} until the deadline", req.invocation_id)
        self.counters.throttled += 1
        waited = self.settings.admission.max_queue_wait_ms
        return error(
            "throttled", f"{what}; waited {waited} ms, the most an invocation queues", req.invocation_id
        )

    async def _hand_over(self, req: InvokeRequest, owner: str, ctx: bus.Context) -> None:
        """This replica holds no share of a limit smaller than the replica count: the owner of one
        serves the invocation and answers the caller itself."""
        self.counters.handed_over += 1
        await self._nc.publish(
            subjects.replica_invoke(owner),
            codec.encode(req),
            reply=ctx.reply,
            headers=telemetry.trace_headers(),
        )

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
            attempts = Attempts(prefer=await self._where_is(req) if req.attempt > 1 else None)
        while True:
            now = time.monotonic()
            if now >= deadline:
                why = "; ".join(attempts.failures) or "no node had room"
                return error(
                    "timeout", f"deadline passed before {req.function!r} could run ({why})", req.invocation_id
                )
            choice = await self._next_node(req, record, key, attempts, now, wait_until, deadline)
            if isinstance(choice, ErrorReply):
                return choice
            if choice is None:
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
            payload=req.payload,
            timeout_ms=int((deadline - now) * 1000),
            attempt=attempt,
            reply_to=reply_to,
            batch_acks=True,
            keep_alive_ms=keep_alive[0],
            prewarm_after_ms=keep_alive[1],
            trigger=req.trigger,
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
        if not attempts.woken and self.queue.waiting(CAPACITY):
            # Others wait for room already: queue behind them rather than take the slot the
            # next of them was woken for.
            why = "earlier invocations wait for room"
            refusal = await self._wait(req, CAPACITY, wait_until, deadline, why)
            attempts.woken = True
            return refusal
        decision, total = self._place(req, record, key, attempts.tried, now, telemetry.current() is not None)
        if isinstance(decision, framework.Placed):
            return decision.node_id, Explanation(decision)
        why = "; ".join([*attempts.failures, decision.explain(total)])
        if not decision.wait:
            return error("unavailable", f"no node can run {req.function!r}: {why}", req.invocation_id)
        busy = f"every fitting node is busy ({why})"
        refusal = await self._wait(req, CAPACITY, wait_until, deadline, busy, front=attempts.woken)
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
        self._hold(node_id, key)
        outcome: bytes | BaseException
        try:
            outcome = await self._requester.request(
                subjects.node_invoke(node_id),
                codec.encode(message),
                message.timeout_ms / 1000,
                telemetry.trace_headers(),
                node_id,
            )
        except (bus.NoResponders, bus.PeerLost, bus.RequestTimeout) as exc:
            outcome = exc
        except BaseException:
            self._release_node(node_id, key)
            raise
        return self._outcome(node_id, key, message.invocation_id, outcome)

    def _hold(self, node_id: str, key: str) -> None:
        increment(self._view.held, node_id)
        increment(self._view.held_instances, (node_id, key))

    def _release_node(self, node_id: str, key: str) -> None:
        decrement(self._view.held, node_id)
        decrement(self._view.held_instances, (node_id, key))
        self.queue.wake(CAPACITY)

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
            raise TryElsewhere(f"{node_id} was lost mid-request")
        if isinstance(outcome, bus.RequestTimeout):
            return error("timeout", f"{node_id} did not answer before the deadline", invocation_id, node_id)
        if isinstance(outcome, BaseException):
            raise outcome
        if is_error_reply(outcome):
            result = codec.invoke_result.decode(outcome)
            if result.error.code in nodes.SCHEDULER_RETRIES:
                raise TryElsewhere(f"{node_id}: {result.error.message}")
        self._view.ran(node_id, key)
        # An empty acknowledgement: the node answered the caller itself. Otherwise relay the
        # reply as the node encoded it (no decoding or re-encoding on the hot path).
        return outcome or None

    async def _where_is(self, req: InvokeRequest) -> str | None:
        """The caller sent this invocation before and heard nothing: its first scheduler may have
        died after forwarding it. Every node says whether it has it; the one that has it gets it
        again and answers from the running (or finished) invocation instead of running it twice.
        The wait ends at the first yes, once every node the view holds healthy has said no, or
        after `where_is_timeout_ms` (a node that died with it says nothing)."""
        now = time.monotonic()
        stale_after_s = self.settings.node_stale_after_s
        asking = {node_id for node_id, node in self._view.nodes.items() if node.healthy(now, stale_after_s)}
        if not asking:
            return None
        found: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe_inline(inbox, partial(_count_answer, found, asking))
        try:
            await self._nc.publish(
                subjects.WHERE_IS, codec.encode(WhereIs(invocation_id=req.invocation_id)), reply=inbox
            )
            async with asyncio.timeout(self.settings.where_is_timeout_ms / 1000):
                node = await found
        except TimeoutError:
            log.warning("invocation %s: %s never said whether they have it", req.invocation_id, asking)
            return None
        finally:
            await sub.unsubscribe()
        if node is not None:
            log.info("invocation %s (attempt %d) is already on %s", req.invocation_id, req.attempt, node)
        return node

    def _keep_alive(self, req: InvokeRequest, record: FunctionRecord) -> tuple[int, int]:
        """(keep_alive_ms, prewarm_after_ms) for the node, from this function's arrivals."""
        if not self.settings.keep_alive.enabled or record.spec.runtime == "ebpf":
            return 0, 0
        now = time.time()
        fn = (req.tenant, req.function)
        self.fresh_arrivals[fn] = now
        return self._arrivals_of(fn).record(now).as_ms()

    def _arrivals_of(self, fn: FunctionKey) -> keepalive.Arrivals:
        arrivals = self._arrivals.get(fn)
        if arrivals is None:
            if len(self._arrivals) >= MAX_ARRIVAL_HISTORIES:
                self._arrivals.pop(next(iter(self._arrivals)))
            arrivals = self._arrivals[fn] = keepalive.Arrivals(self.settings.keep_alive)
        return arrivals

    def arrived_elsewhere(self, arrivals: dict[str, float]) -> None:
        """Another replica's recent arrivals (from its beat)."""
        for name, at in arrivals.items():
            tenant, _, function = name.partition("/")
            self._arrivals_of((tenant, function)).seen_elsewhere(at)

    def policy_of(self, fn: FunctionKey) -> keepalive.KeepAlive | None:
        arrivals = self._arrivals.get(fn)
        return arrivals.current if arrivals else None


def _count_answer(
    found: "asyncio.Future[str | None]",
    asking: set[str],
    subject: str,
    reply: str,
    data: bytes,
    headers: dict[str, str] | None,
) -> None:
    """One node's answer to `where-is`: the first yes settles it; so does the last no."""
    if found.done():
        return
    if headers and headers.get(STATUS) == bus.NO_RESPONDERS_STATUS:
        found.set_result(None)  # no node listens at all
        return
    try:
        answer = codec.have_it.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("malformed where-is answer: %s", exc)
        return
    if answer.has:
        found.set_result(answer.node_id)
        return
    asking.discard(answer.node_id)
    if not asking:
        found.set_result(None)


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
