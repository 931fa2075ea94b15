"""Host node NATS handlers (invoke, where-is), heartbeats, keep-alive and prewarming.

Keep-alive follows the scheduler: each invocation says how long its instance stays warm and,
for functions whose next call is predictably far off, to stop it now and start a fresh one
(prewarm) just before that call is due. Without a word from the scheduler `keep_alive_s` holds."""

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from dpu_node.programs import ProgramRuntime
from fabric import bus, metrics, nodes, telemetry
from fabric.bundles import BundleError
from fabric.tasks import TaskSet
from fabric.tracing import NO_SPAN, Span, Unsampled
from host_node import function_logs, phase_spans
from host_node.bundle_cache import BundleCache
from host_node.kernel_probe import KernelProbe
from host_node.runtimes.errors import FunctionFailed
from host_node.runtimes.exec import run_exec
from host_node.runtimes.python import Frame, PythonInstance, output_of
from host_node.sandbox.cgroups import Limits
from host_node.settings import HostNodeSettings
from host_node.spawner import Spawner
from host_node.warm import WarmInstances
from schemas import codec, subjects
from schemas.ebpf import MapsReply, MapsRequest
from schemas.errors import Error
from schemas.messages import (
    ErrorReply,
    FunctionRemoved,
    FunctionSpec,
    Heartbeat,
    InvokeReply,
    LogsReply,
    LogsRequest,
    NodeInvoke,
    NodeLogs,
    function_of,
    instance_key,
)

log = logging.getLogger(__name__)

NODE_MARGIN_S = 0.01  # reply this much before the scheduler's deadline so the reply still counts
PREWARM_INIT_S = 30.0  # a prewarmed instance's start may take this long
LOG_CHECK_S = 2.0  # how often function logs are checked against their size limit
REMOVED_FOR_S = 3600.0  # a removed function is remembered longer than any invocation runs


Respond = Callable[[Any, bus.Context], None]  # bus.Server.respond: sends a handler's answer


class WarmCall:
    """A warm python invocation on the fast path: waiting for an instance, then while it runs."""

    __slots__ = (
        "answer",
        "code_dir",
        "ctx",
        "deadline",
        "handler_started",
        "instance",
        "key",
        "phases",
        "req",
        "span",
        "timeout_s",
        "waiting",
    )

    def __init__(
        self,
        req: NodeInvoke,
        ctx: bus.Context,
        key: str,
        code_dir: Path,
        answer: "asyncio.Future[InvokeReply | ErrorReply]",
        span: Span | Unsampled | None,
    ):
        self.req, self.ctx, self.key, self.code_dir = req, ctx, key, code_dir
        self.answer = answer  # what copies of the invocation wait for (nodes.Once)
        self.span = span
        self.deadline = ctx.received_at + req.timeout_ms / 1000 - NODE_MARGIN_S
        self.instance: PythonInstance | None = None  # once it has one
        self.waiting: asyncio.Future[Any] | None = None  # its place in line for an instance
        self.handler_started = 0.0
        self.timeout_s = 0.0
        self.phases: dict[str, float] = {}


class HostNode:
    def __init__(
        self,
        settings: HostNodeSettings,
        bundles: BundleCache,
        spawner: Spawner,
        respond: Respond,
        programs: ProgramRuntime | None = None,
        probe: KernelProbe | None = None,
    ):
        self.settings = settings
        self._respond = respond
        self._calls: set[WarmCall] = set()  # on the fast path, running
        self._probe = probe  # kernel events for cold-start traces (bcc), where it runs
        self._bundles = bundles
        self._spawner = spawner
        self.programs = programs  # set when this host takes eBPF functions too
        self.warm: WarmInstances[PythonInstance] = WarmInstances(settings.max_instances)
        self.once = nodes.Once(settings.node_id)
        self.inflight = 0
        self._logs = Path(settings.work_dir) / "logs"
        # exec functions have no long-lived process; they are warm while their code is prepared
        # here and recently used (instance_key -> keep-alive deadline, monotonic).
        self._exec_warm: dict[str, float] = {}
        self._memory_of: dict[str, int] = {}  # instance key -> its memory limit (MB)
        self._exec_memory_mb = 0  # of exec runs in progress
        self._prewarm_timers: dict[str, asyncio.TimerHandle] = {}
        # "tenant/name" of removed functions -> when (monotonic): an instance of one that was
        # running or starting then stops once free, until the function is invoked here again
        self._removed: dict[str, float] = {}
        self._tasks = TaskSet()
        self.prewarmed = 0  # instances started ahead of a predicted invocation
        self._metrics = nodes.InvokeMetrics()
        shard = ("hetfaas.shard", "hetfaas.slots")
        metrics.REGISTRY.gauge(
            "hetfaas.pool.ready", "Sandbox slots ready per shard (free, prewarmed)", shard, self._pool_ready
        )
        created = "Slots created per shard (rate() is the refill rate)"
        metrics.REGISTRY.gauge(
            "hetfaas.pool.created", created, ("hetfaas.shard",), self._pool_created, monotonic=True
        )

    def routes(self) -> list[bus.Route]:
        node_id = self.settings.node_id
        routes = [
            bus.Route(
                subjects.node_invoke(node_id), codec.node_invoke, self.on_invoke, fast=self.on_invoke_now
            ),
            self.once.route(),
            bus.Route(
                subjects.FUNCTION_REMOVED, codec.function_removed, self.on_function_removed, inline=True
            ),
            bus.Route(subjects.node_logs(node_id), codec.logs_request, self.on_logs),
        ]
        if self.programs is not None:
            routes.append(bus.Route(subjects.node_maps(node_id), codec.maps_request, self.on_maps))
        return routes

    async def on_logs(self, req: LogsRequest, ctx: bus.Context) -> LogsReply | ErrorReply:
        """The last lines of a function's output on this node (stdout and stderr, as written)."""
        try:
            log_path = function_logs.log_of(self._logs, req.tenant, req.function)
        except ValueError as exc:
            return ErrorReply(error=Error(code="bad_request", message=str(exc)))
        lines, truncated = await asyncio.to_thread(function_logs.tail, log_path, max(0, req.lines))
        if not lines:
            return LogsReply(logs=[])
        return LogsReply(logs=[NodeLogs(node=self.settings.node_id, lines=lines, truncated=truncated)])

    def on_function_removed(self, removed: FunctionRemoved, ctx: bus.Context) -> None:
        """A function was removed: its idle instances stop now, and those still running once
        their call ends, not at their keep-alive; no prewarm starts one again."""
        function = f"{removed.tenant}/{removed.name}"
        stopped = self.warm.stop_idle(function)
        for key in [key for key in self._prewarm_timers if function_of(key) == function]:
            self._prewarm_timers.pop(key).cancel()
        self._exec_warm = {k: until for k, until in self._exec_warm.items() if function_of(k) != function}
        self._removed[function] = time.monotonic()  # running or starting: stopped when free
        if stopped:
            log.info("%s was removed: stopped its %d idle instances", function, stopped)

    def _invoked(self, spec: FunctionSpec) -> None:
        """An invocation of a function removed earlier: it is deployed again."""
        self._removed.pop(f"{spec.tenant}/{spec.name}", None)

    async def on_maps(self, req: MapsRequest, ctx: bus.Context) -> MapsReply:
        """The maps of this tenant's function, and nobody else's (see ProgramRuntime.maps)."""
        assert self.programs is not None
        return self.programs.maps(req)

    def on_invoke_now(self, req: NodeInvoke, ctx: bus.Context) -> bus.Pass | None:
        """The fast path: a warm python invocation is sent to an idle instance as it is read, or
        waits in line for the next one freed when all its instances are busy, and is answered
        from the instance's frame by callback: no task, no coroutines held open while it waits
        or runs. Anything else goes to `on_invoke` (PASS): a cold start, exec and eBPF
        functions, a copy of an invocation seen before, a full node."""
        spec = req.spec
        if self._removed:
            self._invoked(spec)
        if spec.runtime != "python" or self.inflight >= self.settings.capacity:
            return bus.PASS
        if self.once.has(req.invocation_id) or (code_dir := self._bundles.ready(req.bundle_digest)) is None:
            return bus.PASS
        key = instance_key(spec.tenant, spec.name, req.bundle_digest)
        instance = self.warm.pool.take_idle(key)
        if instance is None and self.warm.pool.live(key) < self._instance_limit(spec):
            return bus.PASS  # room for another instance: a cold start
        self.inflight += 1
        span = nodes.open_invoke_span(
            req, ctx, self.settings.node_id, **{"hetfaas.pool_mode": self.settings.sandbox.mode}
        )
        call = WarmCall(req, ctx, key, code_dir, self.once.begin(req.invocation_id), span)
        self._calls.add(call)
        if instance is not None:
            self._send(call, instance)
        else:
            wait_s = call.deadline - time.monotonic()
            call.waiting = self.warm.queue(key, wait_s, partial(self._got_instance, call))
        return None

    def _got_instance(self, call: WarmCall, got: PythonInstance | TimeoutError | None) -> None:
        call.waiting = None
        try:
            if call not in self._calls:  # answered meanwhile (the node stopped): pass it on
                if isinstance(got, PythonInstance):
                    self.warm.release(call.key, got, 0)  # to the next in line, or idle until stopped
            elif isinstance(got, TimeoutError):
                limit = self._instance_limit(call.req.spec)
                why = f"all {limit} instances of the function stayed busy until the deadline"
                self._finish_call(call, FunctionFailed("timeout", why))
            elif got is None:  # one stopped: room to start another, which takes a coroutine
                self._tasks.spawn(self._start_for(call), f"start-for-{call.req.invocation_id}")
            else:
                self._send(call, got)
        except Exception as exc:
            self._call_broke(call, exc)

    def _send(self, call: WarmCall, instance: PythonInstance) -> None:
        call.instance = instance
        now = call.handler_started = time.monotonic()
        call.phases["acquire_ms"] = round((now - call.ctx.received_at) * 1000, 3)
        call.timeout_s = _run_budget(call.req, call.deadline, now)
        try:
            instance.call(call.req.payload, call.timeout_s, partial(self._called, call))
        except ConnectionError as exc:  # it died while idle
            self._called(call, exc)

    def _called(self, call: WarmCall, outcome: Frame | TimeoutError | ConnectionError) -> None:
        if call not in self._calls:
            return  # answered already: the node stopped, and the instance with it
        if isinstance(outcome, TimeoutError | ConnectionError):
            # The instance is stopped, and why it died takes a moment to learn: in a task.
            self._tasks.spawn(self._failed(call, outcome), f"failed-{call.req.invocation_id}")
            return
        req = call.req
        try:
            assert call.instance is not None
            self._give_back(req, call.key, call.code_dir, call.instance)
            call.instance = None  # given back: it may serve another call already
            output = output_of(outcome)
            call.phases["handler_ms"] = _ms_since(call.handler_started)
            self._finish_call(call, self._reply(req, call.ctx.received_at, output, False, call.phases))
        except FunctionFailed as failure:
            self._finish_call(call, failure)
        except Exception as exc:
            self._call_broke(call, exc)

    async def _failed(self, call: WarmCall, exc: TimeoutError | ConnectionError) -> None:
        try:
            assert call.instance is not None
            failure = await call.instance.failure(exc, call.timeout_s)
            if call not in self._calls:
                return  # the node stopped meanwhile, and let the instance go itself
            self._give_back(call.req, call.key, call.code_dir, call.instance)  # stopped: room for another
            call.instance = None
            self._finish_call(call, failure)
        except Exception as broke:
            self._call_broke(call, broke)

    async def _start_for(self, call: WarmCall) -> None:
        """A call that waited in line until an instance stopped: on as `_run_python` goes."""
        try:
            output, cold = await self._run_python(call.req, call.code_dir, call.deadline, call.phases)
            self._finish_call(call, self._reply(call.req, call.ctx.received_at, output, cold, call.phases))
        except FunctionFailed as failure:
            self._finish_call(call, failure)
        except Exception as exc:  # what the handler's path answers `internal` (bus.dispatch)
            self._call_broke(call, exc)

    def _call_broke(self, call: WarmCall, exc: Exception) -> None:
        """A fault of ours on the fast path: logged, the caller hears `internal` at once, and the
        call's instance, in a state nobody knows, is stopped rather than reused."""
        log.error("invocation %s on the fast path", call.req.invocation_id, exc_info=exc)
        instance = call.instance
        if instance is not None and call in self._calls:
            instance.kill()
            try:
                self.warm.release(call.key, instance, 0)  # stopped: forgotten, room for another
            except Exception:
                log.exception("instance of %s not released", call.key)
        self._finish_call(call, FunctionFailed("internal", f"internal error: {type(exc).__name__}: {exc}"))

    def _finish_call(self, call: WarmCall, outcome: InvokeReply | FunctionFailed) -> None:
        """Answer a fast-path call as `on_invoke` would have (once: later outcomes are dropped)."""
        if call not in self._calls:
            return
        self._calls.discard(call)
        req = call.req
        reply: InvokeReply | ErrorReply
        try:
            if isinstance(outcome, FunctionFailed):
                reply = self._error(req, outcome.code, outcome.message, outcome.detail)
            else:
                reply = outcome
            self._observe(req, reply, call.span or NO_SPAN)
        except Exception as exc:  # a bug here must not leave the caller without an answer
            log.exception("invocation %s", req.invocation_id)
            reply = bus.internal_error(exc, req.invocation_id)
        telemetry.close_span(call.span)
        self.inflight -= 1
        self.once.settle(req.invocation_id, call.answer, reply)
        try:
            self._respond(nodes.answer(req, reply), call.ctx)
        except Exception:  # the connection is closing: the scheduler hears of this node's loss
            log.exception("the answer to invocation %s was not sent", req.invocation_id)

    async def on_invoke(self, req: NodeInvoke, ctx: bus.Context) -> InvokeReply | ErrorReply | bus.ReplyTo:
        reply = await self.once.run(req.invocation_id, lambda: self._invoke_traced(req, ctx))
        return nodes.answer(req, reply)

    async def _invoke_traced(self, req: NodeInvoke, ctx: bus.Context) -> InvokeReply | ErrorReply:
        if self._removed:
            self._invoked(req.spec)
        if self.inflight >= self.settings.capacity:
            return self._error(req, "throttled", f"node is running {self.inflight} invocations, its capacity")
        self.inflight += 1
        try:
            with nodes.invoke_span(
                req, ctx, self.settings.node_id, **{"hetfaas.pool_mode": self.settings.sandbox.mode}
            ) as span:
                reply = await self._invoke(req, ctx.received_at)
                self._observe(req, reply, span)
                return reply
        finally:
            self.inflight -= 1

    def _observe(self, req: NodeInvoke, reply: InvokeReply | ErrorReply, span: Any) -> None:
        """Metrics, and the node span's attributes (with a start's phases under it)."""
        self._metrics.ended(req, reply, span, self.settings.sandbox.mode)
        if isinstance(reply, InvokeReply) and isinstance(span, Span) and span.sampled:
            start = record_phases(span, reply, req.spec.runtime)
            if start is not None and self._probe is not None:
                self._tasks.spawn(self._record_kernel(start, span), "kernel-events")

    async def _invoke(self, req: NodeInvoke, received_at: float) -> InvokeReply | ErrorReply:
        # The caller's deadline bounds everything (fetch, waiting for an instance, init); the
        # function's own timeout_ms bounds only its execution, as in Lambda.
        deadline = received_at + req.timeout_ms / 1000 - NODE_MARGIN_S
        if req.spec.runtime == "ebpf":
            if self.programs is None:
                return self._error(req, "unavailable", "this host runs no eBPF (it has no trusted keys)")
            return await self.programs.invoke(req, received_at)  # inside this node's span
        phases: dict[str, float] = {}
        try:
            code_dir, fetched = await self._bundles.ensure(req.bundle_digest)
            if fetched:
                phases["bundle_fetch_ms"] = _ms_since(received_at)
            if req.spec.runtime == "python":
                output, cold = await self._run_python(req, code_dir, deadline, phases)
            else:
                output, cold = await self._run_exec(req, code_dir, deadline, phases)
        except FunctionFailed as failure:
            return self._error(req, failure.code, failure.message, failure.detail)
        except BundleError as exc:
            return self._error(req, "internal", f"cannot get the function's code: {exc}")
        return self._reply(req, received_at, output, cold, phases)

    def _reply(
        self, req: NodeInvoke, received_at: float, output: bytes, cold: bool, phases: dict[str, float]
    ) -> InvokeReply:
        return InvokeReply(
            invocation_id=req.invocation_id,
            node=self.settings.node_id,
            cold_start=cold,
            duration_ms=_ms_since(received_at),
            output=output,
            phases_ms=phases,
            attempts=req.attempt,
        )

    async def _run_python(
        self, req: NodeInvoke, code_dir: Path, deadline: float, phases: dict[str, float]
    ) -> tuple[bytes, bool]:
        spec = req.spec
        key = instance_key(spec.tenant, spec.name, req.bundle_digest)
        self._memory_of[key] = spec.memory_mb
        acquire_started = time.monotonic()
        limit = self._instance_limit(spec)
        start = self._starter(spec, code_dir, deadline, phases)
        instance, cold = await self.warm.acquire(key, limit, start, deadline - acquire_started)
        phases["acquire_ms"] = _ms_since(acquire_started)
        if cold:
            phases["runtime_init_ms"] = instance.init_ms
        handler_started = time.monotonic()
        try:
            output = await instance.invoke(req.payload, _run_budget(req, deadline, handler_started))
        finally:
            self._give_back(req, key, code_dir, instance)
        phases["handler_ms"] = _ms_since(handler_started)
        return output, cold

    def _give_back(self, req: NodeInvoke, key: str, code_dir: Path, instance: PythonInstance) -> None:
        """The instance is free again: idle for the scheduler's keep-alive, or stopped now and
        started afresh just before the function's next call is due (prewarm). An instance of a
        function removed meanwhile stops (unless a call already waits for it)."""
        keep_alive_s, prewarm_after_s = self._keep_alive(req)
        removed = bool(self._removed) and function_of(key) in self._removed
        self.warm.release(key, instance, keep_alive_s, unload=prewarm_after_s > 0 or removed)
        if prewarm_after_s > 0 and not removed:
            self._schedule_prewarm(key, req.spec, code_dir, prewarm_after_s, keep_alive_s)

    async def _record_kernel(self, start: Span, node_span: Span) -> None:
        """The kernel's events for this start (fork, exec, cgroup attach, the slot's mkdir), as a
        `kernel` span under it with one event per tracepoint hit, at the kernel's timestamps."""
        assert self._probe is not None
        pid, slot = node_span.attributes.get("hetfaas.host_pid"), node_span.attributes.get("hetfaas.slot", "")
        if not isinstance(pid, int):
            return
        since_mono = time.monotonic_ns() - (time.time_ns() - node_span.start_ns)
        await self._probe.drained(time.monotonic_ns())
        found = self._probe.events_of(pid, self.settings.node_id, str(slot), since_mono)
        if not found:
            return
        events = [
            (
                f"kernel.{e.tracepoint}",
                e.wall_ns(),
                {"pid": e.pid, "comm": e.comm, **({"cgroup": e.path} if e.path else {})},
            )
            for e in found
        ]
        first, last = events[0][1], events[-1][1]
        attributes = {"hetfaas.kernel_events": len(events)}
        telemetry.record("kernel", first, max(last, first + 1), attributes, parent=start, events=events)

    def _starter(
        self, spec: FunctionSpec, code_dir: Path, deadline: float, phases: dict[str, float]
    ) -> Callable[[], Awaitable[PythonInstance]]:
        handler = spec.handler
        assert handler is not None

        async def start() -> PythonInstance:
            log_path = self._log_path(spec.tenant, spec.name)
            log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                return await PythonInstance.start(
                    self._spawner,
                    handler,
                    code_dir,
                    log_fd,
                    self.settings.max_output_bytes,
                    deadline - time.monotonic(),
                    self._limits(spec),
                    phases,
                )
            finally:
                os.close(log_fd)

        return start

    def _instance_limit(self, spec: FunctionSpec) -> int:
        return min(spec.concurrency, self.settings.max_instances_per_function)

    def _keep_alive(self, req: NodeInvoke) -> tuple[float, float]:
        """(keep-alive, prewarm-after) in seconds: the scheduler's policy for this function, or
        this node's default keep-alive."""
        keep_alive_s = req.keep_alive_ms / 1000 if req.keep_alive_ms > 0 else self.settings.keep_alive_s
        return keep_alive_s, max(req.prewarm_after_ms, 0) / 1000

    def _schedule_prewarm(
        self, key: str, spec: FunctionSpec, code_dir: Path, after_s: float, keep_alive_s: float
    ) -> None:
        """Start an instance of `key` in `after_s` (replacing any earlier plan for it)."""
        if (earlier := self._prewarm_timers.pop(key, None)) is not None:
            earlier.cancel()

        def fire() -> None:
            self._prewarm_timers.pop(key, None)
            self._tasks.spawn(self._prewarm(key, spec, code_dir, keep_alive_s), f"prewarm {key}")

        self._prewarm_timers[key] = asyncio.get_running_loop().call_later(after_s, fire)

    async def _prewarm(self, key: str, spec: FunctionSpec, code_dir: Path, keep_alive_s: float) -> None:
        start = self._starter(spec, code_dir, time.monotonic() + PREWARM_INIT_S, {})
        try:
            if await self.warm.prewarm(key, self._instance_limit(spec), start, keep_alive_s):
                self.prewarmed += 1
                log.info("prewarmed %s (kept %.0fs)", key, keep_alive_s)
        except FunctionFailed as failure:
            log.warning("prewarming %s failed: %s", key, failure.message)

    async def _run_exec(
        self, req: NodeInvoke, code_dir: Path, deadline: float, phases: dict[str, float]
    ) -> tuple[bytes, bool]:
        assert req.spec.command is not None
        key = instance_key(req.spec.tenant, req.spec.name, req.bundle_digest)
        started = time.monotonic()
        cold = key not in self._exec_warm
        self._exec_warm[key] = started + self._keep_alive(req)[0]
        self._exec_memory_mb += req.spec.memory_mb
        try:
            output = await run_exec(
                self._spawner,
                req.spec.command,
                code_dir,
                req.payload,
                _run_budget(req, deadline, started),
                self.settings.max_output_bytes,
                self._limits(req.spec),
                phases,
            )
        finally:
            self._exec_memory_mb -= req.spec.memory_mb
        phases["handler_ms"] = _ms_since(started)
        return output, cold

    def _limits(self, spec: FunctionSpec) -> Limits:
        return self.settings.sandbox.limits_for(spec.memory_mb)

    def _log_path(self, tenant: str, name: str) -> Path:
        """Where an instance's stdout and stderr go (its tenant's directory made if need be)."""
        try:
            path = function_logs.log_of(self._logs, tenant, name)
        except ValueError as exc:
            raise FunctionFailed("bad_request", str(exc)) from None
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _error(self, req: NodeInvoke, code, message: str, detail: str | None = None) -> ErrorReply:
        return nodes.error_reply(req, self.settings.node_id, code, message, detail)

    def _pool_ready(self) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for s in self._spawner.states():
            out[(str(s.shard), "free")] = s.free
            out[(str(s.shard), "prewarmed")] = s.prewarmed
        return out

    def _pool_created(self) -> dict[tuple[str, ...], float]:
        return {(str(s.shard),): s.created for s in self._spawner.states()}

    def memory_used_mb(self) -> int:
        pool = self.warm.pool
        return self._exec_memory_mb + sum(pool.live(key) * mb for key, mb in self._memory_of.items())

    def heartbeat(self, seq: int) -> Heartbeat:
        warm_idle = self.warm.pool.idle_counts()
        programs = self.programs
        if programs is not None:
            warm_idle.update(programs.warm_keys())
        return Heartbeat(
            node_id=self.settings.node_id,
            seq=seq,
            inflight=self.inflight,
            capacity=self.settings.capacity,
            instances=self.warm.pool.total,
            warm_idle=warm_idle,
            sandbox_mode=self.settings.sandbox.mode,
            pool=self._spawner.states(),
            memory_used_mb=self.memory_used_mb(),
            tenant_runs=dict(programs.tenant_runs) if programs else {},
            tenants=programs.tenant_usage() if programs else {},
        )

    async def reap_idle(self) -> None:
        """Stop instances whose keep-alive ran out (each has its own, set by the scheduler)."""
        period = min(self.settings.keep_alive_s / 4, 1.0)
        while True:
            await asyncio.sleep(period)
            if reaped := self.warm.reap():
                log.info("stopped %d idle instances past their keep-alive", reaped)
            now = time.monotonic()
            self._exec_warm = {k: until for k, until in self._exec_warm.items() if until >= now}
            live = self.warm.pool
            self._memory_of = {k: mb for k, mb in self._memory_of.items() if live.live(k)}
            self._removed = {f: at for f, at in self._removed.items() if now - at < REMOVED_FOR_S}

    async def keep_logs_bounded(self) -> None:
        """Rotate function logs past `max_log_bytes` (see function_logs), off the event loop."""
        while True:
            await asyncio.sleep(LOG_CHECK_S)
            rotated = await asyncio.to_thread(
                function_logs.rotate_oversized, self._logs, self.settings.max_log_bytes
            )
            for path in rotated:
                log.info("rotated %s (over %d bytes)", path, self.settings.max_log_bytes)

    async def close(self) -> None:
        for timer in self._prewarm_timers.values():
            timer.cancel()
        await self._stop_calls(self.settings.shutdown_grace_s)
        await self._tasks.close()
        self.warm.close()

    async def _stop_calls(self, grace_s: float) -> None:
        """Let the fast path's invocations finish for up to `grace_s`, then stop their instances;
        their callers hear `unavailable` (the scheduler tries another node)."""
        if self._calls and grace_s > 0:
            await asyncio.wait([call.answer for call in self._calls], timeout=grace_s)
        for call in list(self._calls):
            if call.waiting is not None:
                call.waiting.cancel()
            if call.instance is not None:
                call.instance.kill()
                self.warm.release(call.key, call.instance, 0)  # stopped: forgotten, no prewarm
            self._finish_call(
                call, FunctionFailed("unavailable", "the node stopped before the function returned")
            )


def record_phases(span: Span, reply: InvokeReply, runtime: str) -> Span | None:
    """The start's phases as children of the node's span (slot, sandbox, exec, init, handler);
    returns the span the kernel's part of the start belongs under (None: no process started)."""
    laid_out = phase_spans.layout(reply.phases_ms, span.start_ns, time.time_ns(), reply.cold_start, runtime)
    parents: dict[str, Span | None] = {"": span}
    for phase in laid_out:
        parent = parents.get(phase.parent) or span
        parents[phase.name] = telemetry.record(phase.name, phase.start_ns, phase.end_ns, parent=parent)
    return parents.get("node.cold_start") or (parents.get("node.handler") if runtime == "exec" else None)


def _run_budget(req: NodeInvoke, deadline: float, now: float) -> float:
    """Seconds the function may run: its own timeout, cut short by the caller's deadline."""
    return min(req.spec.timeout_ms / 1000, deadline - now)


def _ms_since(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 3)
