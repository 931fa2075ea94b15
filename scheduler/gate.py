"""Admission on one scheduler replica: this replica's shares of the function's and the tenant's
concurrency limits (shares.py), handing an invocation to the replica that holds a share when
this one has none, and the FIFO wait queue for limits and for room on a node. Invoker asks
here before placing anything."""

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fabric import bus, telemetry
from fabric.connection import Connection
from scheduler import shares
from scheduler.admission import Blocked, FunctionKey, Running
from scheduler.capacity import CapacityQueue, RecentPeaks
from scheduler.settings import SchedulerSettings
from scheduler.waiting import QueueFull, WaitQueue
from schemas import codec, subjects
from schemas.messages import ErrorReply, FunctionRecord, InvokeRequest, error_reply

CAPACITY = ("capacity",)  # invocations waiting for room on a node: in their tenant's line (capacity.py)
# A replica handing an invocation over passes the caller's reply subject in this header, not as
# the message's reply: nats-server lets no client send an `_R_.` subject (a tenant account's
# request, docs/architecture.md §8) on as a reply.
HAND_OVER_REPLY = "Hetfaas-Reply-To"


@dataclass
class Counters:
    throttled: int = 0  # turned away: queue full, or waited its longest
    handed_over: int = 0  # sent to a replica holding a share of a limit this one has none of
    resent: int = 0  # a caller's resend of an invocation this replica is still handling: dropped


class AdmissionGate:
    def __init__(
        self,
        settings: SchedulerSettings,
        nc: Connection,
        replicas: Callable[[], shares.Replicas],
        tenant_limit: Callable[[str], int],
        tenant_weight: Callable[[str], int],
    ):
        self.settings = settings
        self._nc = nc
        self._replicas = replicas
        self._tenant_limit = tenant_limit
        self.running = Running()
        self.queue = WaitQueue(settings.admission.max_queue)
        self.capacity = CapacityQueue(self.queue, self.running.tenants, tenant_weight)
        self.peaks = RecentPeaks()  # each tenant's most admitted at once lately (capacity.py)
        self.counters = Counters()

    def may_start_now(self, req: InvokeRequest, record: FunctionRecord) -> bool:
        """Whether the invocation may start without waiting: within this replica's shares of
        its limits, with nobody queued ahead of it on them or for room on a node."""
        if self.capacity.waiting():
            return False
        fn: FunctionKey = (req.tenant, req.function)
        fn_limit, tenant_limit = self._shares(req, record)
        if fn_limit == 0 or tenant_limit == 0 or self.running.blocked(fn, fn_limit, tenant_limit):
            return False
        return self._queued_ahead(fn, fn_limit, tenant_limit) is None

    async def admit(
        self, req: InvokeRequest, record: FunctionRecord, deadline: float, ctx: bus.Context
    ) -> Literal["admitted", "handed_over"] | ErrorReply:
        """Wait until the invocation's limits let it start (then it is running: `leave` when it
        ends), hand it over to the replica holding a share of them, or refuse it."""
        fn: FunctionKey = (req.tenant, req.function)
        fn_limit, tenant_limit = self._shares(req, record)
        if fn_limit == 0 or tenant_limit == 0:
            owner = self._owner(req, record, fn_limit == 0)
            if owner is not None and not subjects.is_replica_invoke(ctx.subject):
                await self._hand_over(req, owner, ctx)
                return "handed_over"  # the owner answers the caller
            # handed to us already, or no live owner: serve it, one at a time
            fn_limit, tenant_limit = fn_limit if fn_limit != 0 else 1, tenant_limit or 1
        wait_until = self.wait_until(ctx, deadline)
        refusal = await self._wait_for_limits(req, fn, (fn_limit, tenant_limit), wait_until, deadline)
        if refusal is not None:
            return refusal
        self.enter(fn)
        return "admitted"

    def enter(self, fn: FunctionKey) -> None:
        """An admitted invocation starts (here, or on the fast path after `may_start_now`)."""
        self.running.enter(fn)
        self.peaks.note(fn[0], self.running.tenants[fn[0]], time.monotonic())

    def leave(self, fn: FunctionKey) -> None:
        """An admitted invocation is done: the next waiting on its limits may go."""
        self.running.leave(fn)
        self.queue.wake(("function", f"{fn[0]}/{fn[1]}"))
        self.queue.wake(("tenant", fn[0]))

    def wait_until(self, ctx: bus.Context, deadline: float) -> float:
        """The longest an invocation may wait in the queue."""
        return min(deadline, ctx.received_at + self.settings.admission.max_queue_wait_ms / 1000)

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

    async def _wait_for_limits(
        self,
        req: InvokeRequest,
        fn: FunctionKey,
        limits: tuple[int | None, int],
        wait_until: float,
        deadline: float,
    ) -> ErrorReply | None:
        """Wait (FIFO) until neither limit stops `fn`. A newcomer queues behind invocations
        already waiting on the same limit instead of taking the slot one of them was woken for."""
        fn_limit, tenant_limit = limits
        woken = False
        while True:
            blocked = self.running.blocked(fn, fn_limit, tenant_limit)
            if blocked is None and not woken:
                blocked = self._queued_ahead(fn, fn_limit, tenant_limit)
            if blocked is None:
                return None
            reason = (blocked.scope, blocked.name)
            refusal = await self.wait(req, reason, wait_until, deadline, blocked, front=woken)
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

    async def wait(
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
            timeout_s = wait_until - time.monotonic()
            if reason == CAPACITY:
                woken = await self.capacity.wait(req.tenant, timeout_s, front)
            else:
                woken = await self.queue.wait(reason, timeout_s, front)
            telemetry.record("scheduler.queue", started_ns, time.time_ns(), {"hetfaas.waited_for": what})
            if woken:
                return None
        except QueueFull as exc:
            self.counters.throttled += 1
            return error_reply("throttled", f"{what}, and {exc}", req.invocation_id)
        if wait_until >= deadline:
            return error_reply("timeout", f"{what} until the deadline", req.invocation_id)
        self.counters.throttled += 1
        waited = self.settings.admission.max_queue_wait_ms
        return error_reply(
            "throttled", f"{what}; waited {waited} ms, the most an invocation queues", req.invocation_id
        )

    async def _hand_over(self, req: InvokeRequest, owner: str, ctx: bus.Context) -> None:
        """This replica holds no share of a limit smaller than the replica count: the owner of one
        serves the invocation and answers the caller itself."""
        self.counters.handed_over += 1
        await self._nc.publish(
            subjects.replica_invoke(owner),
            codec.encode(req),
            headers={**(telemetry.trace_headers() or {}), HAND_OVER_REPLY: ctx.reply},
        )
