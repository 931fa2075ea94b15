"""The host node's fast path for warm python invocations, as a state machine driven by callbacks.

A call is sent to an idle instance as it is read, or waits in line for the next one freed when
all of its function's instances are busy, and is answered from the instance's frame by callback:
no task and no coroutines held open while it waits or runs (`bench/hops.py`: a task per request
cost the forwarder hop 24 -> 15 µs of CPU). Only the rare turns take a task: starting a fresh
instance when one stopped, and learning why an instance died.

    WAITING --instance freed--> RUNNING --frame--> ANSWERED
       |  \\--one stopped--> STARTING --ran--> ANSWERED
       \\--deadline--> ANSWERED       RUNNING --timeout or death--> FAILING --> ANSWERED

Every state can end in ANSWERED at once (the node stops, or a fault of ours); whatever arrives
for a call already answered is dropped, and an instance it brings is given back."""

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from fabric import bus
from fabric.tasks import TaskSet
from fabric.tracing import Context, Deferred, Span
from host_node import handler_spans
from host_node.cpu_runtime import CpuRuntime, ms_since, run_budget
from host_node.runtimes.errors import FunctionFailed
from host_node.runtimes.python import Frame, FunctionCode, PythonInstance, output_of
from schemas.messages import ErrorReply, InvokeReply, NodeInvoke, instance_key

log = logging.getLogger(__name__)

NODE_MARGIN_S = 0.01  # reply this much before the scheduler's deadline so the reply still counts


class CallState(enum.Enum):
    WAITING = "waiting for an instance"
    STARTING = "starting an instance"
    RUNNING = "running"
    FAILING = "learning why its instance failed"
    ANSWERED = "answered"


# The members as module names: `CallState.ANSWERED` costs ~130 ns a lookup on Python 3.11 (the
# enum's metaclass), a module global ~20, and a call checks its state several times.
WAITING, STARTING, RUNNING, FAILING, ANSWERED = CallState


Ran = tuple[bytes, str]  # the handler's output, and how the call started its instance ("": warm)
Outcome = Ran | FunctionFailed


class WarmCall:
    """One warm python invocation on the fast path."""

    __slots__ = (
        "answer",
        "code",
        "ctx",
        "deadline",
        "handler_started",
        "instance",
        "key",
        "phases",
        "req",
        "span",
        "state",
        "timeout_s",
        "waiting",
    )

    def __init__(
        self,
        req: NodeInvoke,
        ctx: bus.Context,
        key: str,
        code: FunctionCode,
        answer: "asyncio.Future[InvokeReply | ErrorReply]",
        span: Context | None,
    ):
        self.req, self.ctx, self.key, self.code = req, ctx, key, code
        self.answer = answer  # what copies of the invocation wait for (nodes.Once)
        self.span = span
        self.deadline = ctx.received_at + req.timeout_ms / 1000 - NODE_MARGIN_S
        self.state = WAITING
        self.instance: PythonInstance | None = None  # while it holds one
        self.waiting: asyncio.Future[Any] | None = None  # its place in line for an instance
        self.handler_started = 0.0
        self.timeout_s = 0.0
        self.phases: dict[str, float] = {}


class WarmCalls:
    """The calls on the fast path. `answered(call, outcome)` is called exactly once per call."""

    def __init__(self, runtime: CpuRuntime, tasks: TaskSet, answered: Callable[[WarmCall, Outcome], None]):
        self._runtime = runtime
        self._warm = runtime.warm
        self._tasks = tasks
        self._answered = answered
        self.live: set[WarmCall] = set()

    def instance_for(self, req: NodeInvoke) -> tuple[str, PythonInstance | None] | None:
        """(key, an idle instance or None to wait in line for one); None when the call is not
        for the fast path: there is room for another instance (a cold start)."""
        spec = req.spec
        key = instance_key(spec.tenant, spec.name, req.bundle_digest)
        instance = self._warm.take_idle(key)
        if instance is None and self._warm.pool.live(key) < self._runtime.instance_limit(spec):
            return None
        return key, instance

    def begin(self, call: WarmCall, instance: PythonInstance | None) -> None:
        self.live.add(call)
        if instance is not None:
            self._send(call, instance)
        else:
            wait_s = call.deadline - time.monotonic()
            call.waiting = self._warm.queue(call.key, wait_s, partial(self._got_instance, call))

    def _got_instance(self, call: WarmCall, got: PythonInstance | TimeoutError | None) -> None:
        call.waiting = None
        try:
            if call.state is ANSWERED:  # the node stopped meanwhile: pass it on
                if isinstance(got, PythonInstance):
                    self._warm.release(call.key, got, 0)  # to the next in line, or idle until stopped
            elif isinstance(got, TimeoutError):
                limit = self._runtime.instance_limit(call.req.spec)
                why = f"all {limit} instances of the function stayed busy until the deadline"
                self._finish(call, FunctionFailed("timeout", why))
            elif got is None:  # one stopped: room to start another, which takes a coroutine
                call.state = STARTING
                self._tasks.spawn(self._start_for(call), f"start-for-{call.req.invocation_id}")
            else:
                self._send(call, got)
        except Exception as exc:
            self._broke(call, exc)

    def _send(self, call: WarmCall, instance: PythonInstance) -> None:
        call.state = RUNNING
        call.instance = instance
        now = call.handler_started = time.monotonic()
        call.phases["acquire_ms"] = round((now - call.ctx.received_at) * 1000, 3)
        call.timeout_s = run_budget(call.req, call.deadline, now)
        if call.span is not None:
            call.span.set_attribute("faas.instance", instance.instance_id)
        try:
            instance.call(call.req, call.timeout_s, partial(self._called, call), call.span)
        except ConnectionError as exc:  # it died while idle
            self._called(call, exc)

    def _called(self, call: WarmCall, outcome: Frame | TimeoutError | ConnectionError) -> None:
        if call.state is ANSWERED:
            return  # the node stopped, and the instance with it
        if isinstance(outcome, TimeoutError | ConnectionError):
            # The instance is stopped, and why it died takes a moment to learn: in a task.
            call.state = FAILING
            self._tasks.spawn(self._failed(call, outcome), f"failed-{call.req.invocation_id}")
            return
        try:
            assert call.instance is not None
            if (spans := call.instance.take_spans()) and isinstance(call.span, Span | Deferred):
                handler_spans.record(call.span, spans)
            self._runtime.give_back(call.req, call.key, call.code, call.instance)
            call.instance = None  # given back: it may serve another call already
            output = output_of(outcome)
            call.phases["handler_ms"] = ms_since(call.handler_started)
            self._finish(call, (output, ""))
        except FunctionFailed as failure:
            self._finish(call, failure)
        except Exception as exc:
            self._broke(call, exc)

    async def _failed(self, call: WarmCall, exc: TimeoutError | ConnectionError) -> None:
        try:
            assert call.instance is not None
            failure = await call.instance.failure(exc, call.timeout_s)
            if call.state is ANSWERED:
                return  # the node stopped meanwhile, and let the instance go itself
            self._runtime.give_back(call.req, call.key, call.code, call.instance)  # room for another
            call.instance = None
            self._finish(call, failure)
        except Exception as broke:
            self._broke(call, broke)

    async def _start_for(self, call: WarmCall) -> None:
        """A call that waited in line until an instance stopped: on as the handler's path goes."""
        try:
            self._finish(
                call, await self._runtime.run_python(call.req, call.code, call.deadline, call.phases)
            )
        except FunctionFailed as failure:
            self._finish(call, failure)
        except Exception as exc:  # what the handler's path answers `internal` (bus.dispatch)
            self._broke(call, exc)

    def _broke(self, call: WarmCall, exc: Exception) -> None:
        """A fault of ours: logged, the caller hears `internal` at once, and the call's instance,
        in a state nobody knows, is stopped rather than reused."""
        log.error("invocation %s on the fast path", call.req.invocation_id, exc_info=exc)
        instance = call.instance
        if instance is not None and call.state is not ANSWERED:
            instance.kill()
            try:
                self._warm.release(call.key, instance, 0)  # stopped: forgotten, room for another
            except Exception:
                log.exception("instance of %s not released", call.key)
        self._finish(call, FunctionFailed("internal", f"internal error: {type(exc).__name__}: {exc}"))

    def _finish(self, call: WarmCall, outcome: Outcome) -> None:
        """The call's first outcome is its answer; later ones are dropped."""
        if call.state is ANSWERED:
            return
        call.state = ANSWERED
        self.live.discard(call)
        self._answered(call, outcome)

    async def stop(self, grace_s: float) -> None:
        """Let the calls finish for up to `grace_s`, then stop their instances; their callers
        hear `unavailable` (the scheduler tries another node)."""
        if self.live and grace_s > 0:
            await asyncio.wait([call.answer for call in self.live], timeout=grace_s)
        for call in list(self.live):
            if call.waiting is not None:
                call.waiting.cancel()
            if call.instance is not None:
                call.instance.kill()
                self._warm.release(call.key, call.instance, 0)  # stopped: forgotten, no prewarm
            self._finish(call, FunctionFailed("unavailable", "the node stopped before the function returned"))
