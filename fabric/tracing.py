"""A small tracer that speaks W3C trace context and OTLP, cheap enough for the warm path.

The OpenTelemetry SDK costs 50-65 µs of CPU per span here (measured: start, attributes, end,
context attach/detach, propagation, batch export); three spans per invocation would cost a warm
invocation a third of its throughput. This tracer keeps what the platform uses: spans with
attributes and events, parent/child links within a process (a context variable) and across NATS
hops (`traceparent`), the OTEL_TRACES_SAMPLER samplers, and batch export on a background thread
as OTLP/JSON (lines in a file, or OTLP/HTTP), so any OpenTelemetry backend reads its output.
A span costs a few µs: an object, two clock reads, and its encoding later, off the hot path.
"""

import contextvars
import enum
import logging
import os
import random
import threading
import time
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fabric import otlp

log = logging.getLogger(__name__)
_ids = random.Random(int.from_bytes(os.urandom(16), "little"))


class SpanKind(enum.IntEnum):
    """OTLP's numbering."""

    INTERNAL = 1
    SERVER = 2
    CLIENT = 3
    PRODUCER = 4
    CONSUMER = 5


class Span:
    __slots__ = (
        "attributes",
        "end_ns",
        "error",
        "events",
        "kind",
        "name",
        "parent_id",
        "sampled",
        "span_id",
        "start_ns",
        "trace_id",
    )

    def __init__(
        self,
        name: str,
        trace_id: int,
        parent_id: int,
        sampled: bool,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: dict[str, Any] | None = None,
        start_ns: int | None = None,
    ):
        self.trace_id = trace_id
        self.span_id = _ids.getrandbits(64) or 1
        self.parent_id = parent_id  # 0: a root span
        self.name = name
        self.kind = kind
        self.start_ns = time.time_ns() if start_ns is None else start_ns
        self.end_ns = 0
        self.attributes: dict[str, Any] = attributes if attributes is not None else {}
        self.events: list[tuple[str, int, Mapping[str, Any]]] = []
        self.sampled = sampled
        self.error = ""

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def add_event(
        self, name: str, attributes: Mapping[str, Any] | None = None, at_ns: int | None = None
    ) -> None:
        self.events.append((name, time.time_ns() if at_ns is None else at_ns, attributes or {}))

    def set_error(self, message: str) -> None:
        self.error = message

    def traceparent(self) -> str:
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{'01' if self.sampled else '00'}"


class NoSpan:
    """What callers get when tracing is off: accepts everything, records nothing."""

    __slots__ = ()
    sampled = False

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def add_event(
        self, name: str, attributes: Mapping[str, Any] | None = None, at_ns: int | None = None
    ) -> None:
        pass

    def set_error(self, message: str) -> None:
        pass


class Unsampled(NoSpan):
    """A span the sampler left out: it carries the trace onward (children and the next hop stay
    unsampled) and records nothing, so an unsampled invocation costs almost nothing."""

    __slots__ = ("span_id", "trace_id")
    attributes: dict[str, Any] = {}
    start_ns = 0

    def __init__(self, trace_id: int, span_id: int):
        self.trace_id = trace_id
        self.span_id = span_id  # the parent's: nothing here will ever refer to this span

    def traceparent(self) -> str:
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-00"


NO_SPAN = NoSpan()
_current: contextvars.ContextVar["Span | Unsampled | None"] = contextvars.ContextVar(
    "hetfaas_span", default=None
)


def current_context() -> "Span | Unsampled | None":
    """The current span, recording or not: what the next hop's `traceparent` continues."""
    return _current.get()


def current_span() -> "Span | None":
    """The current span if it records (None for none, or an unsampled one)."""
    span = _current.get()
    return span if isinstance(span, Span) else None


def parse_traceparent(value: str) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) from a W3C `traceparent`, or None if malformed."""
    # version(2)-trace id(32)-parent id(16)-flags(2); sliced rather than split: this runs per message
    if len(value) != 55 or value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    try:
        trace_id, span_id, flags = int(value[3:35], 16), int(value[36:52], 16), int(value[53:], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(flags & 1)


# --- sampling (the OTEL_TRACES_SAMPLER values) -----------------------------------------------

Sampler = Callable[[int, bool | None], bool]  # (trace id, parent's sampled flag or None) -> sample?


def sampler_from_env(environ: Mapping[str, str] = os.environ) -> Sampler:
    name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    try:
        ratio = float(environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
    except ValueError:
        ratio = 1.0
    bound = int(max(0.0, min(ratio, 1.0)) * (1 << 64))

    def by_ratio(trace_id: int) -> bool:
        return (trace_id & 0xFFFFFFFFFFFFFFFF) < bound

    roots: dict[str, Callable[[int], bool]] = {
        "always_on": lambda _: True,
        "always_off": lambda _: False,
        "traceidratio": by_ratio,
    }
    base = name.removeprefix("parentbased_")
    root = roots.get(base)
    if root is None:
        log.warning("unknown OTEL_TRACES_SAMPLER %r: sampling everything", name)
        root = roots["always_on"]
    if name.startswith("parentbased_"):
        return lambda trace_id, parent: root(trace_id) if parent is None else parent
    return lambda trace_id, parent: root(trace_id)


# --- export ------------------------------------------------------------------------------------


class BatchExporter:
    """Finished spans queue here and leave in batches (OTEL_BSP_*) as OTLP/JSON.

    A full batch is encoded by the thread that finished its last span, the service's event
    loop: handing spans to another thread to encode cost the scheduler ~5 µs more per span
    (the GIL passed back and forth) than encoding them itself. The background thread writes the
    encoded batches (a file append or an HTTP POST, which must not block the loop) and, every
    OTEL_BSP_SCHEDULE_DELAY, encodes and writes what a quiet service left short of a batch."""

    def __init__(self, service: str, write: Callable[[bytes], None], environ: Mapping[str, str] = os.environ):
        self._resource = otlp.resource(service)
        self._write = write
        # 1 s rather than OpenTelemetry's 5 s: `hetfaas invoke --trace` waits for the spans
        self._delay_s = int(environ.get("OTEL_BSP_SCHEDULE_DELAY", "1000")) / 1000
        self._max_queue = int(environ.get("OTEL_BSP_MAX_QUEUE_SIZE", "2048"))
        self._batch = max(1, int(environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512")))
        self._spans: deque[Span] = deque()
        self._bodies: deque[tuple[int, bytes]] = deque()  # (spans in it, encoded batch) to write
        self._wake = threading.Event()
        self._stopping = False
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=f"span-export-{service}", daemon=True)
        self._thread.start()

    def add(self, span: Span) -> None:
        queued = len(self._spans)
        if queued >= self._max_queue:
            self.dropped += 1  # a slow backend must not grow the process without bound
            return
        self._spans.append(span)
        if queued + 1 >= self._batch:
            self._encode_batch()

    def _encode_batch(self) -> None:
        """Encode up to a batch of queued spans (here or on the background thread: deque
        operations are atomic, so each span goes in exactly one batch)."""
        batch: list[Span] = []
        try:
            while len(batch) < self._batch:
                batch.append(self._spans.popleft())
        except IndexError:
            pass
        if not batch:
            return
        if (len(self._bodies) + 1) * self._batch > max(self._max_queue, self._batch):
            self.dropped += len(batch)  # the writer is behind: bounded, like the span queue
            return
        try:
            self._bodies.append((len(batch), otlp.encode(self._resource, batch)))
        except Exception as exc:  # a span that cannot be encoded costs its batch, not the service
            log.warning("could not encode %d spans: %s", len(batch), exc)
            return
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            self._export_all()
        self._export_all()

    def _export_all(self) -> None:
        while self._spans:
            self._encode_batch()
        while self._bodies:
            count, body = self._bodies.popleft()
            try:
                self._write(body)
            except Exception as exc:  # backend down, disk full: the spans are lost, the service is not
                log.warning("could not export %d spans: %s", count, exc)

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)


def file_writer(path: Path) -> Callable[[bytes], None]:
    """OTLP-JSON lines: one ExportTraceServiceRequest per line, appended."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(body: bytes) -> None:
        with open(path, "ab") as out:
            out.write(body + b"\n")

    return write


def http_writer(signal: str = "traces", environ: Mapping[str, str] = os.environ) -> Callable[[bytes], None]:
    """OTLP/HTTP with the JSON encoding, to OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT or
    OTEL_EXPORTER_OTLP_ENDPOINT + /v1/<signal>, with OTEL_EXPORTER_OTLP_HEADERS."""
    url = environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT") or (
        environ["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + f"/v1/{signal}"
    )
    headers = {"Content-Type": "application/json"}
    for pair in filter(None, environ.get("OTEL_EXPORTER_OTLP_HEADERS", "").split(",")):
        key, _, value = pair.partition("=")
        headers[key.strip()] = urllib.parse.unquote(value.strip())
    timeout_s = int(environ.get("OTEL_EXPORTER_OTLP_TIMEOUT", "10000")) / 1000

    def write(body: bytes) -> None:
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()

    return write


class Tracer:
    """One per process: starts spans, finishes them into the exporter."""

    def __init__(self, exporter: BatchExporter, sampler: Sampler):
        self.exporter = exporter
        self._sample = sampler

    def start(
        self,
        name: str,
        parent: Mapping[str, str] | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: dict[str, Any] | None = None,
        start_ns: int | None = None,
    ) -> "Span | Unsampled":
        """A span under `parent` (incoming `traceparent` headers), else under the current span,
        else a new trace."""
        remote = parse_traceparent(parent["traceparent"]) if parent and "traceparent" in parent else None
        if remote is not None:
            trace_id, parent_id, parent_sampled = remote
            sampled = self._sample(trace_id, parent_sampled)
        elif (local := _current.get()) is not None:
            trace_id, parent_id, sampled = local.trace_id, local.span_id, local.sampled
        else:
            trace_id, parent_id = _ids.getrandbits(128) or 1, 0
            sampled = self._sample(trace_id, None)
        if not sampled:
            return Unsampled(trace_id, parent_id or _ids.getrandbits(64) or 1)
        return Span(name, trace_id, parent_id, sampled, kind, attributes, start_ns)

    def finish(self, span: "Span | Unsampled", end_ns: int | None = None) -> None:
        if isinstance(span, Span):
            span.end_ns = time.time_ns() if end_ns is None else end_ns
            self.exporter.add(span)

    def record(
        self,
        name: str,
        parent: Span,
        start_ns: int,
        end_ns: int,
        attributes: dict[str, Any] | None = None,
        events: Sequence[tuple[str, int, Mapping[str, Any]]] | None = None,
    ) -> Span:
        """A finished child of `parent` for something already timed (a phase of a cold start),
        with `events` (name, time, attributes) already known."""
        child = Span(
            name, parent.trace_id, parent.span_id, parent.sampled, SpanKind.INTERNAL, attributes, start_ns
        )
        if events:
            child.events.extend(events)
        self.finish(child, end_ns)
        return child

    def shutdown(self) -> None:
        self.exporter.shutdown()


class Scope:
    """`with tracer_scope:` makes the span current and finishes it on the way out."""

    __slots__ = ("_token", "_tracer", "span")

    def __init__(self, tracer: Tracer, span: "Span | Unsampled"):
        self._tracer = tracer
        self.span = span

    def __enter__(self) -> "Span | Unsampled":
        self._token = _current.set(self.span)
        return self.span

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        _current.reset(self._token)
        if exc is not None and isinstance(self.span, Span) and not self.span.error:
            self.span.set_error(f"{type(exc).__name__}: {exc}")
        self._tracer.finish(self.span)


class Within:
    """`with Within(span):` makes a span current for a while without finishing it (a span opened
    on one path and finished in a callback)."""

    __slots__ = ("_token", "span")

    def __init__(self, span: "Span | Unsampled | None"):
        self.span = span

    def __enter__(self) -> "Span | Unsampled | None":
        self._token = _current.set(self.span)
        return self.span

    def __exit__(self, *exc_info: object) -> None:
        _current.reset(self._token)


class NoScope:
    __slots__ = ()

    def __enter__(self) -> NoSpan:
        return NO_SPAN

    def __exit__(self, *exc_info: object) -> None:
        pass


NO_SCOPE = NoScope()
