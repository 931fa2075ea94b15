"""The node's side of a warm python instance (see python_worker.py for the other side)."""

import asyncio
import json
import socket
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from fabric import tracing
from fabric.deadlines import of_loop, timeouts
from host_node.runtimes import protocol
from host_node.runtimes.errors import FunctionFailed
from host_node.runtimes.launch import launch_worker
from host_node.sandbox.cgroups import Limits
from host_node.spawner import Process, Spawner, death_of
from schemas.messages import NodeInvoke

Traced = tracing.Context | None  # the invocation's span on this node, if any


def handler_traceparent(span: Traced) -> str:
    """The handler's parent: the node's span. A deferred one is given as sampled, so that the
    handler's own spans are recorded and sent; the node keeps them only if it keeps its span."""
    if span is None:
        return ""
    parent = span.traceparent()
    return parent[:-2] + "01" if type(span) is tracing.Deferred else parent


class FunctionCode(NamedTuple):
    """Where a python function's files are on this node: its bundle, and its dependency layer."""

    code_dir: Path
    deps_dir: Path | None = None


WORKER_FD = 3  # the instance's end of the socket, as numbered inside its process
SEQ_SIZE = protocol.SEQ.size
NO_DEPS = "-"  # the worker's DEPS_DIR argument when there is no layer (python_worker.py)

# How a cold start got its instance (InvokeReply.start_path, the trace's hetfaas.start_path)
START_FRESH = "fresh"  # a sandbox and an interpreter started for it
START_STEM_CELL = "stem_cell"  # an interpreter already waiting in its sandbox (python_stem.py)
START_TEMPLATE_FORK = "template_fork"  # forked from the function's template (python_template.py)

Frame = tuple[int, bytes]  # (kind, body): see protocol.py
# What a frame's reader hears: the frame, or TimeoutError (the deadline passed) or
# ConnectionError (the instance closed its socket: it died, or was killed; or it broke the
# protocol, ProtocolViolation).
OnFrame = Callable[[Frame | TimeoutError | ConnectionError], None]


class ProtocolViolation(ConnectionError):
    """The instance sent what the node never takes: a frame larger than its kind may be, of a
    kind the worker never sends, or one nobody asked for. The handler runs in the worker's
    process and can write to its socket, so this is a function attacking its node: the socket is
    closed at once (nothing more is read or buffered) and the instance stopped."""


class FrameChannel(asyncio.Protocol):
    """Frames over the instance's socket. A Protocol rather than streams: on the warm path every
    microsecond of the node's CPU counts, and this parses frames straight out of data_received.

    The instance is an adversary: a frame is refused at its header when it is larger than its
    kind may be (the output cap for OUTPUT, `protocol.MAX_TEXT_FRAME` for the others), so the
    node never buffers more than that; and at most one frame is taken per frame asked for (READY
    at start, an answer per INVOKE), so an answer is never matched to another call."""

    def __init__(self, max_output: int) -> None:
        self._max_output = max_output
        self._asked = 1  # frames the node waits for: READY (or INIT_ERROR) first
        self.spans = b""  # the handler's own spans sent before the answer (SPANS), until taken
        self._seq = b""  # the number of the call asked for (protocol.SEQ)
        self._spans_allowed = False  # one SPANS frame per answer asked for
        self.violation = ""  # why the instance was cut off, if it was
        self._buffer = bytearray()
        self._frames: deque[Frame] = deque()
        self._waiter: asyncio.Future[Frame] | None = None
        self._on_frame: OnFrame | None = None  # see `expect`
        self._slot = 0  # the deadline's slot, while `_on_frame` waits
        self._loop = asyncio.get_running_loop()  # made by the loop's create_unix_connection
        self._expiries = of_loop(self._loop, _expire)  # looked up once: `expect` runs per invocation
        self._transport: asyncio.BaseTransport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # a uvloop transport is no asyncio.Transport subclass, but writes

    def data_received(self, data: bytes) -> None:
        if self.violation:
            return  # cut off: the transport is closing
        buffer = self._buffer
        buffer += data
        header = protocol.HEADER.size
        while len(buffer) >= header:
            size, kind = protocol.HEADER.unpack_from(buffer)
            if problem := self._refused(size, kind):
                self._cut_off(problem)
                return
            if len(buffer) < header + size:
                return
            if kind == protocol.SPANS:
                self._spans_allowed = False
                self.spans = bytes(buffer[header : header + size])
            elif kind in protocol.ANSWERS:
                if buffer[header : header + SEQ_SIZE] != self._seq:
                    self._cut_off("an answer to another call than the one it was given")
                    return
                self._asked -= 1
                self._deliver((kind, bytes(buffer[header + SEQ_SIZE : header + size])))
            else:
                self._asked -= 1
                self._deliver((kind, bytes(buffer[header : header + size])))
            del buffer[: header + size]

    def _refused(self, size: int, kind: int) -> str:
        if kind not in protocol.FROM_WORKER:
            return f"a frame of kind {kind}, which the worker never sends"
        limit = self._max_output if kind == protocol.OUTPUT else protocol.MAX_TEXT_FRAME
        if size > limit + (SEQ_SIZE if kind in protocol.ANSWERS else 0):  # an answer's number besides
            return f"a frame of {size} bytes, over the {limit} a frame of its kind may be"
        if kind in protocol.ANSWERS and size < SEQ_SIZE:
            return "an answer without the number of its call"
        if self._asked <= 0:
            return "a frame the node did not ask for"
        if kind == protocol.SPANS and not self._spans_allowed:
            return "a second SPANS frame for one invocation"
        return ""

    def _cut_off(self, problem: str) -> None:
        self.violation = problem
        self._buffer = bytearray()  # its memory back now, not when the transport lets go
        self._frames.clear()
        if self._transport is not None:
            self._transport.close()
        self._lost(ProtocolViolation(f"the instance broke the node's protocol: {problem}"))

    def _deliver(self, frame: Frame) -> None:
        if self._on_frame is not None:
            self._hand_over(frame)
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(frame)
        else:
            self._frames.append(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(ConnectionError("python instance closed its socket"))

    def _lost(self, error: ConnectionError) -> None:
        if self.closed:
            return
        self.closed = True
        if self._on_frame is not None:
            self._hand_over(error)
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)

    def send(self, data: bytes, seq: bytes) -> None:
        """Send an INVOKE numbered `seq` (its answer is the next frame the node takes, and must
        say that number)."""
        if self.closed or self._transport is None:
            raise ConnectionError(self.violation or "python instance closed its socket")
        self._seq = seq
        self._asked += 1
        self._spans_allowed = True
        self._transport.write(data)  # type: ignore[attr-defined]

    def expect(self, timeout_s: float, on_frame: OnFrame) -> None:
        """The next frame goes to `on_frame` as it is read, with no coroutine waiting for it (a
        node's fast path); TimeoutError after `timeout_s` (at most 5 ms late, as `receive`)."""
        if self._frames:
            on_frame(self._frames.popleft())
        elif self.closed:
            on_frame(ConnectionError(self.violation or "python instance closed its socket"))
        else:
            loop = self._loop
            self._on_frame = on_frame
            self._slot = self._expiries.add(loop, loop.time() + max(timeout_s, 0), self)

    def _hand_over(self, outcome: Frame | TimeoutError | ConnectionError) -> None:
        on_frame, self._on_frame = self._on_frame, None
        if on_frame is not None:
            if not isinstance(outcome, TimeoutError):
                self._expiries.discard(self._slot, self)
            on_frame(outcome)

    async def receive(self, timeout_s: float) -> Frame:
        """The next frame; TimeoutError after `timeout_s` (at most 5 ms late: `fabric.deadlines`,
        cheaper than a timer of its own per invocation)."""
        if self._frames:
            return self._frames.popleft()
        if self.closed:
            raise ConnectionError(self.violation or "python instance closed its socket")
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        deadlines = timeouts(loop)
        slot = deadlines.add(loop, loop.time() + max(timeout_s, 0), waiter)
        try:
            return await waiter
        finally:
            deadlines.discard(slot, waiter)
            self._waiter = None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _expire(channel: FrameChannel) -> None:
    channel._hand_over(TimeoutError())


class PythonInstance:
    def __init__(self, proc: Process, channel: FrameChannel, init_ms: float, wants_context: bool = False):
        self._proc = proc
        self._channel = channel
        self.init_ms = init_ms
        self.wants_context = wants_context  # handle(event, context): INVOKE_WITH_CONTEXT frames
        self.start_path = START_FRESH
        self.instance_id = ""  # faas.instance: set by the node that started it (cpu_runtime.py)
        self.before_kill: Callable[[], object] | None = None
        self._calls = 0  # calls sent, numbering each (protocol.SEQ)
        self._killed = False

    @property
    def process(self) -> Process:
        return self._proc

    @property
    def healthy(self) -> bool:
        """Not stopped, and its socket open (an instance that broke the protocol, or died while
        idle, is not given another call)."""
        return not self._killed and not self._channel.closed

    @classmethod
    async def start(
        cls,
        spawner: Spawner,
        handler: str,
        code_dir: Path,
        log_fd: int,
        max_output: int,
        timeout_s: float,
        limits: Limits,
        phases: dict[str, float],
        payload_form: str = "bytes",
        deps_dir: Path | None = None,
    ) -> "PythonInstance":
        """A fresh instance: a sandbox started for it, the interpreter, the handler's import."""
        view = spawner.view(code_dir, deps_dir)
        argv = [view.python, "-I", "-S", f"{view.runtime_dir}/python_worker.py", str(WORKER_FD), handler]
        argv += [view.code_dir, str(max_output), payload_form] + ([view.deps_dir] if view.deps_dir else [])
        proc, parent = await launch_worker(spawner, argv, code_dir, limits, log_fd, phases, deps_dir)
        return await cls.ready(proc, parent, handler, max_output, timeout_s)

    @classmethod
    async def ready(
        cls, proc: Process, sock: socket.socket, handler: str, max_output: int, timeout_s: float
    ) -> "PythonInstance":
        """The instance once its worker says the handler is imported (READY); FunctionFailed,
        and the process killed, when it fails to import or misses the deadline."""
        loop = asyncio.get_running_loop()
        try:
            _, channel = await loop.create_unix_connection(lambda: FrameChannel(max_output), sock=sock)
        except BaseException:
            proc.kill()
            sock.close()
            raise
        try:
            kind, body = await channel.receive(timeout_s)
        except (TimeoutError, ConnectionError) as exc:
            proc.kill()
            channel.close()
            timed_out = isinstance(exc, TimeoutError)
            why = "did not finish importing before the deadline" if timed_out else "exited"
            raise FunctionFailed(
                "timeout" if timed_out else "function_error", f"python instance {why} during init"
            ) from None
        if kind != protocol.READY:
            proc.kill()
            channel.close()
            raise FunctionFailed(
                "function_error", f"handler {handler} failed to load", body.decode(errors="replace")
            )
        wants = body.endswith(protocol.WANTS_CONTEXT)
        return cls(proc, channel, float(body.removesuffix(protocol.WANTS_CONTEXT)), wants)

    def _send(self, req: NodeInvoke, cold_start: bool, timeout_s: float, span: Traced) -> None:
        """The call's INVOKE, numbered (protocol.SEQ)."""
        self._calls += 1
        seq = protocol.SEQ.pack(self._calls & 0xFFFFFFFF)
        if not self.wants_context:
            self._channel.send(protocol.frame(protocol.INVOKE, seq + req.payload), seq)
            return
        context = context_line(req, cold_start, timeout_s, handler_traceparent(span))
        self._channel.send(protocol.frame(protocol.INVOKE_WITH_CONTEXT, seq + context + req.payload), seq)

    async def invoke(self, req: NodeInvoke, timeout_s: float, cold_start: bool = False) -> bytes:
        """Run the handler once; any failure that leaves the worker unusable marks it unhealthy."""
        try:
            self._send(req, cold_start, timeout_s, tracing.current_context())
            frame = await self._channel.receive(timeout_s)
        except (TimeoutError, ConnectionError) as exc:
            raise await self.failure(exc, timeout_s) from None
        return output_of(frame)

    def call(self, req: NodeInvoke, timeout_s: float, on_frame: OnFrame, span: Traced = None) -> None:
        """`invoke` without a coroutine (a warm call): the answer goes to `on_frame` as it is
        read; read it with `output_of`, and a TimeoutError or ConnectionError with `failure`.
        Raises ConnectionError if the instance's socket is closed already."""
        self._send(req, False, timeout_s, span)
        self._channel.expect(timeout_s, on_frame)

    async def failure(self, exc: TimeoutError | ConnectionError, timeout_s: float) -> FunctionFailed:
        """What the caller hears when the instance did not answer; it is stopped either way."""
        if isinstance(exc, ProtocolViolation):
            self.kill()
            return FunctionFailed("function_error", f"{exc}; it was stopped")
        if isinstance(exc, TimeoutError):
            self.kill()
            return FunctionFailed("timeout", f"function did not return within {timeout_s * 1000:.0f} ms")
        why = await death_of(self._proc)
        self.kill()
        return FunctionFailed("function_error", f"python instance died during the invocation: {why}")

    def take_spans(self) -> bytes:
        """The handler's own spans of its last invocation (a SPANS body; b"" when none)."""
        spans, self._channel.spans = self._channel.spans, b""
        return spans

    def kill(self) -> None:
        if not self._killed and self.before_kill is not None:
            self.before_kill()  # its last CPU reading (host_node/usage.py), while /proc has it
        self._killed = True
        self._proc.kill()
        self._channel.close()


def context_line(req: NodeInvoke, cold_start: bool, timeout_s: float, traceparent: str = "") -> bytes:
    """What a handle(event, context) handler's context holds, as the line before the payload;
    `traceparent` (W3C) is the node's span of the invocation, for the handler's own spans."""
    context = {
        "invocation_id": req.invocation_id,
        "function": req.spec.name,
        "tenant": req.spec.tenant,
        "cold_start": cold_start,
        "remaining_ms": int(timeout_s * 1000),
        "traceparent": traceparent,
    }
    return json.dumps(context, separators=(",", ":")).encode() + b"\n"


def output_of(frame: Frame) -> bytes:
    """The handler's output, or FunctionFailed for what it raised or returned too much of."""
    kind, body = frame
    if kind == protocol.OUTPUT:
        return body
    if kind == protocol.OUTPUT_TOO_LARGE:
        raise FunctionFailed("function_error", f"output of {body.decode()} bytes is over the node's limit")
    text = body.decode(errors="replace")
    raise FunctionFailed("function_error", "handler raised " + _last_line(text), text)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "an exception"
