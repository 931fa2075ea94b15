"""Host node NATS handlers (invoke, where-is), heartbeats, keep-alive and prewarming.

Keep-alive follows the scheduler: each invocation says how long its instance stays warm and,
for functions whose next call is predictably far off, to stop it now and start a fresh one
(prewarm) just before that call is due. Without a word from the scheduler `keep_alive_s` holds."""

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from dpu_node.programs import ProgramRuntime
from fabric import bus, metrics, nodes, telemetry
from fabric.bundles import BundleError
from fabric.tasks import TaskSet
from fabric.tracing import Span
from host_node import phase_spans
from host_node.bundle_cache import BundleCache
from host_node.kernel_probe import KernelProbe
from host_node.runtimes.errors import FunctionFailed
from host_node.runtimes.exec import run_exec
from host_node.runtimes.python import PythonInstance
from host_node.sandbox.cgroups import Limits
from host_node.settings import HostNodeSettings
from host_node.spawner import Spawner
from host_node.warm import WarmInstances
from schemas import codec, subjects
from schemas.ebpf import MapsReply, MapsRequest
from schemas.manifest import NAME_RE
from schemas.messages import ErrorReply, FunctionSpec, Heartbeat, InvokeReply, NodeInvoke, instance_key

log = logging.getLogger(__name__)

NODE_MARGIN_S = 0.01  # reply this much before the scheduler's deadline so the reply still counts
PREWARM_INIT_S = 30.0  # a prewarmed instance's start may take this long


class HostNode:
    def __init__(
        self,
        settings: HostNodeSettings,
        bundles: BundleCache,
        spawner: Spawner,
        programs: ProgramRuntime | None = None,
        probe: KernelProbe | None = None,
    ):
        self.settings = settings
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
            bus.Route(subjects.node_invoke(node_id), codec.node_invoke, self.on_invoke),
            self.once.route(),
        ]
        if self.programs is not None:
            routes.append(bus.Route(subjects.node_maps(node_id), codec.maps_request, self.on_maps))
        return routes

    async def on_maps(self, req: MapsRequest, ctx: bus.Context) -> MapsReply:
        """The maps of this tenant's function, and nobody else's (see ProgramRuntime.maps)."""
        assert self.programs is not None
        return self.programs.maps(req)

    async def on_invoke(self, req: NodeInvoke, ctx: bus.Context) -> InvokeReply | ErrorReply | bus.ReplyTo:
        reply = await self.once.run(req.invocation_id, lambda: self._invoke_traced(req, ctx))
        return nodes.answer(req, reply)

    async def _invoke_traced(self, req: NodeInvoke, ctx: bus.Context) -> InvokeReply | ErrorReply:
        if self.inflight >= self.settings.capacity:
            return self._error(req, "throttled", f"node is running {self.inflight} invocations, its capacity")
        self.inflight += 1
        try:
            with nodes.invoke_span(
                req, ctx, self.settings.node_id, **{"hetfaas.pool_mode": self.settings.sandbox.mode}
            ) as span:
                reply = await self._invoke(req, ctx.received_at)
                if isinstance(reply, InvokeReply):
                    init_ms = reply.phases_ms.get("acquire_ms") or reply.phases_ms.get("program_load_ms")
                    self._metrics.observe(req, reply, self.settings.sandbox.mode, init_ms)
                    span.set_attribute("faas.coldstart", reply.cold_start)
                    if isinstance(span, Span) and span.sampled:
                        start = record_phases(span, reply, req.spec.runtime)
                        if start is not None and self._probe is not None:
                            self._tasks.spawn(self._record_kernel(start, span), "kernel-events")
                else:
                    span.set_attribute("hetfaas.error", reply.error.code)
                return reply
        finally:
            self.inflight -= 1

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
        keep_alive_s, prewarm_after_s = self._keep_alive(req)
        try:
            output = await instance.invoke(req.payload, _run_budget(req, deadline, handler_started))
        finally:
            self.warm.release(key, instance, keep_alive_s, unload=prewarm_after_s > 0)
            if prewarm_after_s > 0:
                self._schedule_prewarm(key, spec, code_dir, prewarm_after_s, keep_alive_s)
        phases["handler_ms"] = _ms_since(handler_started)
        return output, cold

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
        """Where an instance's stdout and stderr go. The names come off the wire: anyone who can
        publish to this node's subject could send "../", so check them before building a path."""
        if not (NAME_RE.match(tenant) and NAME_RE.match(name)):
            raise FunctionFailed("bad_request", f"invalid tenant or function name {tenant!r}/{name!r}")
        path = self._logs / tenant / f"{name}.log"
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

    async def close(self) -> None:
        for timer in self._prewarm_timers.values():
            timer.cancel()
        await self._tasks.close()
        self.warm.close()


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
