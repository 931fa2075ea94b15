"""Host node NATS handlers: invoke (the warm fast path in warm_call.py, everything else through
the handler's path), where-is, logs, maps and function-removed, and heartbeats. The work itself
is the runtimes': `CpuRuntime` for python and exec functions, `ProgramRuntime` for eBPF ones (on
a host with `[ebpf]` settings)."""

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ebpf_runtime.programs import ProgramRuntime
from fabric import bus, nodes, telemetry
from fabric.bundles import BundleError
from fabric.tasks import TaskSet
from fabric.tracing import NO_SPAN, recording
from host_node import function_logs, phase_spans
from host_node.bundle_cache import BundleCache
from host_node.cpu_runtime import CpuRuntime, ms_since
from host_node.kernel_probe import KernelProbe
from host_node.log_clock import LogClock
from host_node.quiet import Quiet
from host_node.runtimes.errors import FunctionFailed
from host_node.runtimes.python import FunctionCode
from host_node.settings import HostNodeSettings
from host_node.spawner import Spawner, spawner_gauges
from host_node.warm_call import NODE_MARGIN_S, Outcome, WarmCall, WarmCalls
from schemas import codec, subjects
from schemas.ebpf import MapsReply, MapsRequest
from schemas.messages import (
    DrainNode,
    DrainReply,
    ErrorReply,
    FunctionRemoved,
    Heartbeat,
    InvokeReply,
    LogPosition,
    LogsReply,
    LogsRequest,
    NodeInvoke,
    NodeLogs,
    RecentReply,
    RecentRequest,
    error_reply,
)

log = logging.getLogger(__name__)

Respond = Callable[[Any, bus.Context], None]  # bus.Server.respond: sends a handler's answer


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
        self._probe = probe  # kernel events for cold-start traces (bcc), where it runs
        self._bundles = bundles
        self._spawner = spawner
        self.logs = Path(settings.work_dir) / "logs"
        self.log_clock = LogClock()  # when each function log grew (logs --since, -f)
        self._tasks = TaskSet()
        self.runtime = CpuRuntime(settings, spawner, self.logs, self._tasks, Quiet(lambda: self.inflight > 0))
        self.calls = WarmCalls(self.runtime, self._tasks, self._answer_call)
        self.programs = programs  # set when this host takes eBPF functions too
        self.once = nodes.Once(settings.node_id)
        self.inflight = 0
        self._metrics = nodes.InvokeMetrics(settings.node_id)
        spawner_gauges(spawner)
        self.runtime.usage.register()

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
            bus.Route(subjects.node_drain(node_id), codec.drain_node, self.on_drain),
            bus.Route(subjects.node_recent(node_id), codec.recent_request, self.on_recent),
        ]
        if self.programs is not None:
            routes.append(bus.Route(subjects.node_maps(node_id), codec.maps_request, self.on_maps))
        return routes

    async def on_logs(self, req: LogsRequest, ctx: bus.Context) -> LogsReply | ErrorReply:
        """The last lines of a function's output on this node (stdout and stderr, as written)."""
        try:
            log_path = function_logs.log_of(self.logs, req.tenant, req.function)
        except ValueError as exc:
            return error_reply("bad_request", str(exc))
        node_id, clock = self.settings.node_id, self.log_clock
        after, lines_wanted = req.after.get(node_id), max(0, req.lines)
        for _ in range(3):  # a rotation (on its thread) between the generation and the read: again
            generation = clock.generation(log_path)
            if after is not None:
                read_on, was = function_logs.read_on, (after.generation, after.offset)
                lines, truncated, end = await asyncio.to_thread(read_on, log_path, clock, *was, lines_wanted)
            elif req.since:
                start = clock.offset_at(log_path, req.since)
                read_from = function_logs.read_from
                lines, truncated, end = await asyncio.to_thread(read_from, log_path, start, lines_wanted)
            else:  # the last lines, and where the log ends now
                lines, truncated = await asyncio.to_thread(function_logs.tail, log_path, lines_wanted)
                end = await asyncio.to_thread(function_logs.size_of, log_path)
            if clock.generation(log_path) == generation:
                break
        if not lines and not end:
            return LogsReply(logs=[])
        position = LogPosition(generation=generation, offset=end)
        logs = NodeLogs(node=node_id, lines=lines, truncated=truncated, position=position)
        return LogsReply(logs=[logs])

    async def on_recent(self, req: RecentRequest, ctx: bus.Context) -> RecentReply:
        """The function's last invocations here (an eBPF function's too, on a host that runs them)."""
        found = self._metrics.recent.of(req.tenant, req.function)
        if self.programs is not None:
            found = sorted(found + self.programs.recent.of(req.tenant, req.function), key=lambda r: r.at)
        return RecentReply(invocations=found)

    async def on_drain(self, req: DrainNode, ctx: bus.Context) -> DrainReply:
        """Drained (the schedulers place nothing more here): release the warm instances now, and
        those running once their call ends; undrained: keep them warm again."""
        released = self.runtime.drain(req.drain)
        if req.drain:
            log.warning(
                "drained: released %d warm instances; %d invocations still run", released, self.inflight
            )
        else:
            log.warning("no longer drained: placements may come again")
        return DrainReply(
            node_id=self.settings.node_id, cordoned=req.drain, released=released, running=self.inflight
        )

    def on_function_removed(self, removed: FunctionRemoved, ctx: bus.Context) -> None:
        """A function was removed: its instances stop (see CpuRuntime.removed)."""
        if stopped := self.runtime.removed(removed.tenant, removed.name, removed.deployed_at):
            log.info(
                "%s/%s was removed: stopped its %d idle instances", removed.tenant, removed.name, stopped
            )

    async def on_maps(self, req: MapsRequest, ctx: bus.Context) -> MapsReply:
        """The maps of this tenant's function, and nobody else's (see ProgramRuntime.maps)."""
        assert self.programs is not None
        return self.programs.maps(req)

    def on_invoke_now(self, req: NodeInvoke, ctx: bus.Context) -> bus.Pass | None:
        """The fast path (warm_call.py): a warm python invocation, answered later by callback.
        Anything else goes to `on_invoke` (PASS): a cold start, exec and eBPF functions, a copy
        of an invocation seen before, a full node."""
        self.runtime.invoked(req.spec, req.deployed_at)
        if req.spec.runtime != "python" or self.inflight >= self.settings.capacity:
            return bus.PASS
        if self.once.has(nodes.run_key(req)) or (code := self._code_ready(req)) is None:
            return bus.PASS
        if (taken := self.calls.instance_for(req)) is None:
            return bus.PASS  # room for another instance: a cold start
        key, instance = taken
        self.inflight += 1
        span = nodes.open_invoke_span(
            req, ctx, self.settings.node_id, **{"hetfaas.pool_mode": self.settings.sandbox.mode}
        )
        self.calls.begin(WarmCall(req, ctx, key, code, self.once.begin(nodes.run_key(req)), span), instance)
        return None

    def _answer_call(self, call: WarmCall, outcome: Outcome) -> None:
        """Answer a fast-path call as `on_invoke` would have."""
        req = call.req
        reply: InvokeReply | ErrorReply
        try:
            if isinstance(outcome, FunctionFailed):
                reply = self._failed(req, outcome)
            else:
                reply = self._reply(req, call.ctx.received_at, *outcome, call.phases)
            self._observe(req, reply, call.span or NO_SPAN)
        except Exception as exc:  # a bug here must not leave the caller without an answer
            log.exception("invocation %s", req.invocation_id)
            reply = bus.internal_error(exc, req.invocation_id)
        telemetry.close_span(call.span)
        self.inflight -= 1
        if not self.inflight:
            self.runtime.quiet.idle()
        self.once.settle(nodes.run_key(req), call.answer, reply)
        try:
            self._respond(nodes.answer(req, reply), call.ctx)
        except Exception:  # the connection is closing: the scheduler hears of this node's loss
            log.exception("the answer to invocation %s was not sent", req.invocation_id)

    async def on_invoke(self, req: NodeInvoke, ctx: bus.Context) -> InvokeReply | ErrorReply | bus.ReplyTo:
        reply = await self.once.run(nodes.run_key(req), lambda: self._invoke_traced(req, ctx))
        return nodes.answer(req, reply)

    async def _invoke_traced(self, req: NodeInvoke, ctx: bus.Context) -> InvokeReply | ErrorReply:
        self.runtime.invoked(req.spec, req.deployed_at)
        if self.inflight >= self.settings.capacity:
            why = f"node is running {self.inflight} invocations, its capacity"
            return error_reply("throttled", why, req.invocation_id, self.settings.node_id)
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
            if not self.inflight:
                self.runtime.quiet.idle()

    def _observe(self, req: NodeInvoke, reply: InvokeReply | ErrorReply, span: Any) -> None:
        """Metrics, and the node span's attributes (with a start's phases under it)."""
        self._metrics.ended(req, reply, span, self.settings.sandbox.mode)
        if isinstance(reply, InvokeReply) and recording(span):
            start = phase_spans.record_phases(span, reply, req.spec.runtime)
            if start is not None and self._probe is not None:
                kernel = phase_spans.record_kernel(self._probe, self.settings.node_id, start, span)
                self._tasks.spawn(kernel, "kernel-events")

    async def _invoke(self, req: NodeInvoke, received_at: float) -> InvokeReply | ErrorReply:
        # The caller's deadline bounds everything (fetch, waiting for an instance, init); the
        # function's own timeout_ms bounds only its execution, as in Lambda.
        deadline = received_at + req.timeout_ms / 1000 - NODE_MARGIN_S
        if req.spec.runtime == "ebpf":
            if self.programs is None:
                why = "this host runs no eBPF (it has no trusted keys)"
                return error_reply("unavailable", why, req.invocation_id, self.settings.node_id)
            return await self.programs.invoke(req, received_at)  # inside this node's span
        phases: dict[str, float] = {}
        try:
            code_dir, fetched = await self._bundles.ensure(req.bundle_digest)
            deps_dir = None
            if req.layer_digest:
                deps_dir, fetched_layer = await self._bundles.ensure(req.layer_digest)
                fetched = fetched or fetched_layer
            if fetched:
                phases["bundle_fetch_ms"] = ms_since(received_at)
            if req.spec.runtime == "python":
                code = FunctionCode(code_dir, deps_dir)
                output, start_path = await self.runtime.run_python(req, code, deadline, phases)
            else:
                output, start_path = await self.runtime.run_exec(req, code_dir, deadline, phases)
        except FunctionFailed as failure:
            return self._failed(req, failure)
        except BundleError as exc:
            why = f"cannot get the function's code: {exc}"
            return error_reply("internal", why, req.invocation_id, self.settings.node_id)
        return self._reply(req, received_at, output, start_path, phases)

    def _code_ready(self, req: NodeInvoke) -> FunctionCode | None:
        """The function's bundle and layer, if both are here already (no waiting)."""
        if (code_dir := self._bundles.ready(req.bundle_digest)) is None:
            return None
        if not req.layer_digest:
            return FunctionCode(code_dir)
        deps_dir = self._bundles.ready(req.layer_digest)
        return None if deps_dir is None else FunctionCode(code_dir, deps_dir)

    def _failed(self, req: NodeInvoke, failure: FunctionFailed) -> ErrorReply:
        node_id = self.settings.node_id
        return error_reply(failure.code, failure.message, req.invocation_id, node_id, failure.detail)

    def _reply(
        self, req: NodeInvoke, received_at: float, output: bytes, start_path: str, phases: dict[str, float]
    ) -> InvokeReply:
        """`start_path`: how a cold start got its instance ("": it was warm)."""
        return InvokeReply(
            invocation_id=req.invocation_id,
            node=self.settings.node_id,
            cold_start=bool(start_path),
            start_path=start_path,
            duration_ms=ms_since(received_at),
            output=output,
            phases_ms=phases,
            attempts=req.attempt,
        )

    def heartbeat(self, seq: int) -> Heartbeat:
        pool = self.runtime.warm.pool
        warm_idle = pool.idle_counts()
        programs = self.programs
        if programs is not None:
            warm_idle.update(programs.warm_keys())
        return Heartbeat(
            node_id=self.settings.node_id,
            seq=seq,
            inflight=self.inflight,
            capacity=self.settings.capacity,
            instances=pool.total,
            warm_idle=warm_idle,
            sandbox_mode=self.settings.sandbox.mode,
            pool=self._spawner.states(),
            memory_used_mb=self.runtime.memory_used_mb(),
            tenant_runs=dict(programs.tenant_runs) if programs else {},
            tenants=programs.tenant_usage() if programs else {},
            stem_cells=self.runtime.stems.ready,
            templates=self.runtime.templates.alive(),
        )

    async def close(self) -> None:
        self.runtime.stop_prewarms()
        await self.calls.stop(self.settings.shutdown_grace_s)
        await self._tasks.close()
        self.runtime.close()
