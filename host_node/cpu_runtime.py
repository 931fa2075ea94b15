"""Running CPU functions on a host node, the counterpart of `ebpf_runtime.programs.ProgramRuntime`:
warm python instances (taken, started, given back, prewarmed), exec functions' warmth, the
memory their sandboxes hold, and the functions removed while instances of them still run.

Keep-alive follows the scheduler: each invocation says how long its instance stays warm and,
for functions whose next call is predictably far off, to stop it now and start a fresh one
(prewarm) just before that call is due. Without a word from the scheduler `keep_alive_s` holds."""

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

from fabric import telemetry
from fabric.tasks import TaskSet
from host_node import function_logs, handler_spans
from host_node.quiet import Quiet
from host_node.removals import Removals
from host_node.runtimes.errors import FunctionFailed
from host_node.runtimes.exec import run_exec
from host_node.runtimes.python import (
    START_FRESH,
    START_STEM_CELL,
    START_TEMPLATE_FORK,
    FunctionCode,
    PythonInstance,
)
from host_node.runtimes.python_stem import StemLost
from host_node.runtimes.python_template import ForkFailed, Template, forks_possible
from host_node.sandbox.cgroups import Limits
from host_node.settings import HostNodeSettings
from host_node.spawner import Spawner
from host_node.stem_cells import StemCells
from host_node.templates import Templates
from host_node.usage import FunctionUsage
from host_node.warm import WarmInstances
from schemas.messages import FunctionSpec, NodeInvoke, function_of, instance_key

log = logging.getLogger(__name__)

PREWARM_INIT_S = 30.0  # a prewarmed instance's start may take this long


class CpuRuntime:
    def __init__(
        self,
        settings: HostNodeSettings,
        spawner: Spawner,
        logs: Path,
        tasks: TaskSet,
        quiet: Quiet | None = None,
    ):
        self.settings = settings
        self._spawner = spawner
        self._logs = logs
        self._tasks = tasks
        self.warm: WarmInstances[PythonInstance] = WarmInstances(settings.max_instances)
        # exec functions have no long-lived process; they are warm while their code is prepared
        # here and recently used (instance_key -> keep-alive deadline, monotonic).
        self._exec_warm: dict[str, float] = {}
        self._memory_of: dict[str, int] = {}  # instance key -> its memory limit (MB)
        self._exec_memory_mb = 0  # of exec runs in progress
        self._prewarm_timers: dict[str, asyncio.TimerHandle] = {}
        self._removed = Removals()  # an instance running or starting then stops once free
        self.draining = False  # `hetfaas node drain`: instances stop when free, none is prewarmed
        self.prewarmed = 0  # instances started ahead of a predicted invocation
        self._instance_numbers = itertools.count(1)
        self.usage = FunctionUsage()  # CPU and memory per function, read when metrics are collected
        idle = settings.sandbox.limits_for(settings.sandbox.idle_memory_mb)
        self.quiet = quiet or Quiet()  # background starts wait while invocations run
        self.stems = StemCells(spawner, idle, settings.python_stem_cells, self.quiet)
        forking = settings.python_templates and settings.sandbox.mode != "plain" and forks_possible()
        self.templates = Templates(tasks, forking, self.quiet)

    def instance_limit(self, spec: FunctionSpec) -> int:
        return min(spec.concurrency, self.settings.max_instances_per_function)

    # --- removed functions ---

    def removed(self, tenant: str, name: str, deployed_at: float = 0.0) -> int:
        """A function was removed: its idle instances stop now (returns how many), and those
        still running once their call ends, not at their keep-alive; no prewarm starts one again."""
        function = f"{tenant}/{name}"
        stopped = self.warm.stop_idle(function)
        for key in [key for key in self._prewarm_timers if function_of(key) == function]:
            self._prewarm_timers.pop(key).cancel()
        self._exec_warm = {k: until for k, until in self._exec_warm.items() if function_of(k) != function}
        self._removed.removed(function, deployed_at, time.monotonic())  # running or starting: when free
        self.templates.stop_function(function)
        return stopped

    def drain(self, on: bool) -> int:
        """Drained: every idle instance stops now (returns how many), every running one when its
        call ends, and no prewarm starts one; undrained: instances stay warm again."""
        self.draining = on
        if not on:
            return 0
        self.stop_prewarms()
        self._prewarm_timers.clear()
        self._exec_warm = {}
        for key in self.templates.keys():
            self.templates.drop(key)
        return self.warm.stop_idle()

    def invoked(self, spec: FunctionSpec, deployed_at: float = 0.0) -> None:
        """An invocation: of another deployment than a removed one, the function is back."""
        if self._removed:  # every invocation passes here: nothing built when none is removed
            self._removed.invoked(f"{spec.tenant}/{spec.name}", deployed_at)

    # --- python ---

    async def run_python(
        self, req: NodeInvoke, code: FunctionCode, deadline: float, phases: dict[str, float]
    ) -> tuple[bytes, str]:
        """The handler's output and, if this call started its instance (a cold start), how:
        START_TEMPLATE_FORK, START_STEM_CELL or START_FRESH ("": a warm instance)."""
        spec = req.spec
        key = instance_key(spec.tenant, spec.name, req.bundle_digest)
        self._memory_of[key] = spec.memory_mb
        acquire_started = time.monotonic()
        start = self._starter(key, spec, code, deadline, phases)
        instance, cold = await self.warm.acquire(
            key, self.instance_limit(spec), start, deadline - acquire_started
        )
        phases["acquire_ms"] = ms_since(acquire_started)
        if (span := telemetry.current()) is not None:
            span.set_attribute("faas.instance", instance.instance_id)
        if cold:
            phases["runtime_init_ms"] = instance.init_ms
        handler_started = time.monotonic()
        try:
            output = await instance.invoke(req, run_budget(req, deadline, handler_started), cold)
        finally:
            if (spans := instance.take_spans()) and (span := telemetry.current()) is not None:
                handler_spans.record(span, spans)
            self.give_back(req, key, code, instance)
        phases["handler_ms"] = ms_since(handler_started)
        return output, instance.start_path if cold else ""

    def give_back(self, req: NodeInvoke, key: str, code: FunctionCode, instance: PythonInstance) -> None:
        """The instance is free again: idle for the scheduler's keep-alive, or stopped now and
        started afresh just before the function's next call is due (prewarm). An instance of a
        function removed meanwhile stops (unless a call already waits for it)."""
        keep_alive_s, prewarm_after_s = self._keep_alive(req)
        removed = self.draining or (bool(self._removed) and function_of(key) in self._removed)
        self.warm.release(key, instance, keep_alive_s, unload=prewarm_after_s > 0 or removed)
        if prewarm_after_s > 0 and not removed:
            self._schedule_prewarm(key, req.spec, code, prewarm_after_s, keep_alive_s)

    def _starter(
        self, key: str, spec: FunctionSpec, code: FunctionCode, deadline: float, phases: dict[str, float]
    ) -> Callable[[], Awaitable[PythonInstance]]:
        async def start() -> PythonInstance:
            log_fd = self._open_log(spec)
            try:
                instance = await self._start_instance(key, spec, code, deadline, phases, log_fd)
            finally:
                os.close(log_fd)
            instance.instance_id = f"{self.settings.node_id}/python-{next(self._instance_numbers)}"
            self.usage.track((spec.name, spec.tenant), instance.process)
            instance.before_kill = partial(self.usage.read, instance.process)
            if instance.start_path != START_TEMPLATE_FORK:  # the function ran here: its later starts fork
                self.templates.want(key, partial(self._start_template, spec, code))
            return instance

        return start

    async def _start_instance(
        self,
        key: str,
        spec: FunctionSpec,
        code: FunctionCode,
        deadline: float,
        phases: dict[str, float],
        log_fd: int,
    ) -> PythonInstance:
        """Forked from the function's template, else from a stem cell, else fresh."""
        handler = spec.handler
        assert handler is not None
        spawner, max_output, limits = self._spawner, self.settings.max_output_bytes, self._limits(spec)
        if (template := self.templates.take(key)) is not None:
            try:
                instance = await template.fork(spawner, deadline - time.monotonic(), phases)
            except ForkFailed as failed:
                log.warning("forking %s failed (%s); starting it another way", key, failed)
                if not template.alive:
                    self.templates.drop(key)
            else:
                instance.start_path = START_TEMPLATE_FORK
                return instance
        if (stem := self.stems.take()) is not None:
            try:
                instance = await stem.become(
                    spawner, handler, code.code_dir, code.deps_dir, log_fd, max_output,
                    deadline - time.monotonic(), limits, phases, spec.payload,
                )  # fmt: skip
            except StemLost as lost:
                log.warning("%s; starting %s afresh", lost, key)
            else:
                instance.start_path = START_STEM_CELL
                return instance
        return await PythonInstance.start(
            spawner, handler, code.code_dir, log_fd, max_output,
            deadline - time.monotonic(), limits, phases, spec.payload, code.deps_dir,
        )  # fmt: skip

    async def _start_template(self, spec: FunctionSpec, code: FunctionCode) -> Template:
        handler = spec.handler
        assert handler is not None
        log_fd = self._open_log(spec)
        try:
            return await Template.start(
                self._spawner, handler, code, log_fd, self.settings.max_output_bytes,
                PREWARM_INIT_S, self._limits(spec), spec.payload,
            )  # fmt: skip
        finally:
            os.close(log_fd)

    def _open_log(self, spec: FunctionSpec) -> int:
        """The function's log, for an instance's stdout and stderr."""
        log_path = self._log_path(spec.tenant, spec.name)
        return os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def _keep_alive(self, req: NodeInvoke) -> tuple[float, float]:
        """(keep-alive, prewarm-after) in seconds: the scheduler's policy for this function, or
        this node's default keep-alive."""
        keep_alive_s = req.keep_alive_ms / 1000 if req.keep_alive_ms > 0 else self.settings.keep_alive_s
        return keep_alive_s, max(req.prewarm_after_ms, 0) / 1000

    def _schedule_prewarm(
        self, key: str, spec: FunctionSpec, code: FunctionCode, after_s: float, keep_alive_s: float
    ) -> None:
        """Start an instance of `key` in `after_s` (replacing any earlier plan for it)."""
        if (earlier := self._prewarm_timers.pop(key, None)) is not None:
            earlier.cancel()

        def fire() -> None:
            self._prewarm_timers.pop(key, None)
            self._tasks.spawn(self._prewarm(key, spec, code, keep_alive_s), f"prewarm {key}")

        self._prewarm_timers[key] = asyncio.get_running_loop().call_later(after_s, fire)

    async def _prewarm(self, key: str, spec: FunctionSpec, code: FunctionCode, keep_alive_s: float) -> None:
        start = self._starter(key, spec, code, time.monotonic() + PREWARM_INIT_S, {})
        try:
            if await self.warm.prewarm(key, self.instance_limit(spec), start, keep_alive_s):
                self.prewarmed += 1
                log.info("prewarmed %s (kept %.0fs)", key, keep_alive_s)
        except FunctionFailed as failure:
            log.warning("prewarming %s failed: %s", key, failure.message)

    # --- exec ---

    async def run_exec(
        self, req: NodeInvoke, code_dir: Path, deadline: float, phases: dict[str, float]
    ) -> tuple[bytes, str]:
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
                run_budget(req, deadline, started),
                self.settings.max_output_bytes,
                self._limits(req.spec),
                phases,
                lambda proc: self.usage.track((req.spec.name, req.spec.tenant), proc),
            )
        finally:
            self._exec_memory_mb -= req.spec.memory_mb
        phases["handler_ms"] = ms_since(started)
        return output, START_FRESH if cold else ""

    # --- accounting ---

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

    def memory_used_mb(self) -> int:
        pool = self.warm.pool
        templates = set(self.templates.keys())
        held = sum((pool.live(key) + (key in templates)) * mb for key, mb in self._memory_of.items())
        return self._exec_memory_mb + held  # a template holds its function's memory too

    async def reap_idle(self) -> None:
        """Stop instances whose keep-alive ran out (each has its own, set by the scheduler)."""
        period = min(self.settings.keep_alive_s / 4, 1.0)
        while True:
            await asyncio.sleep(period)
            if reaped := self.reap():
                log.info("stopped %d idle instances past their keep-alive", reaped)

    def reap(self) -> int:
        """Stop instances whose keep-alive ran out and forget what has expired; returns how many
        instances were stopped."""
        reaped = self.warm.reap() + self.templates.reap(self.settings.template_keep_alive_s)
        now = time.monotonic()
        self._exec_warm = {k: until for k, until in self._exec_warm.items() if until >= now}
        live = self.warm.pool
        templates = set(self.templates.keys())
        self._memory_of = {k: mb for k, mb in self._memory_of.items() if live.live(k) or k in templates}
        self._removed.forget_old(now)
        return reaped

    def stop_prewarms(self) -> None:
        for timer in self._prewarm_timers.values():
            timer.cancel()

    def close(self) -> None:
        self.warm.close()
        self.stems.close()
        self.templates.close()


def run_budget(req: NodeInvoke, deadline: float, now: float) -> float:
    """Seconds the function may run: its own timeout, cut short by the caller's deadline."""
    return min(req.spec.timeout_ms / 1000, deadline - now)


def ms_since(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 3)
