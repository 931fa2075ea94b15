"""A small tracer that speaks W3C trace context and OTLP, cheap enough for the warm path.

The OpenTelemetry SDK costs 50-65 µs of CPU per span here (measured: start, attributes, end,
context attach/detach, propagation, batch export); three spans per invocation would cost a warm
invocation a third of its throughput. This tracer keeps what the platform uses: spans with
attributes and events, parent/child links within a process (a context variable) and across NATS
hops (fabric/propagation.py), the OTEL_TRACES_SAMPLER samplers with the decision for
invocations made late (fabric/sampling.py), and batch export on a background thread
(fabric/span_export.py) as OTLP, so any OpenTelemetry backend reads its output.
A span costs a few µs: an object, two clock reads, and its encoding later, off the hot path; a
deferred one (a warm invocation's, until its end says whether it is kept) less than one.
"""

import contextvars
import enum
import os
import random
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fabric import propagation
from fabric.propagation import Carried, Propagators
from fabric.sampling import DEFER, SAMPLE, Sampler

if TYPE_CHECKING:
    from fabric.span_export import BatchExporter

_ids = random.Random(int.from_bytes(os.urandom(16), "little"))
MAX_PENDING = 64  # children recorded under a deferred span before its decision (a cold start's phases)


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
        "carried",
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
    deferred = False

    def __init__(
        self,
        name: str,
        trace_id: int,
        parent_id: int,
        sampled: bool,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: dict[str, Any] | None = None,
        start_ns: int | None = None,
        carried: Carried | None = None,
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
        self.carried = carried

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def add_event(
        self, name: str, attributes: Mapping[str, Any] | None = None, at_ns: int | None = None
    ) -> None:
        self.events.append((name, time.time_ns() if at_ns is None else at_ns, attributes or {}))

    def set_error(self, message: str) -> None:
        self.error = message

    def keep(self) -> None:
        """A sampled span is kept anyway (see Deferred.keep)."""

    def traceparent(self) -> str:
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{'01' if self.sampled else '00'}"


class NoSpan:
    """What callers get when tracing is off: accepts everything, records nothing."""

    __slots__ = ()
    sampled = False
    deferred = False

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def add_event(
        self, name: str, attributes: Mapping[str, Any] | None = None, at_ns: int | None = None
    ) -> None:
        pass

    def set_error(self, message: str) -> None:
        pass

    def keep(self) -> None:
        pass


class Unsampled(NoSpan):
    """A span the sampler left out: it carries the trace onward (children and the next hop stay
    unsampled) and records nothing, so an unsampled invocation costs almost nothing."""

    __slots__ = ("carried", "span_id", "trace_id")
    attributes: dict[str, Any] = {}
    start_ns = 0

    def __init__(self, trace_id: int, span_id: int, carried: Carried | None = None):
        self.trace_id = trace_id
        self.span_id = span_id  # the parent's: nothing here will ever refer to this span
        self.carried = carried

    def traceparent(self) -> str:
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-00"


class Deferred:
    """A span whose trace's decision waits for the invocation's end (fabric/sampling.py): its
    ids, which the next hop's `traceparent` already names, its start, and what was said of it.
    Finished unkept, it is forgotten: no Span is built, nothing is encoded. `keep()` (a cold
    start, a failure) keeps it and the deferred spans above it in this process; finished kept,
    it becomes the Span it would have been, with the children recorded under it meanwhile."""

    __slots__ = (
        "attributes",
        "carried",
        "end_ns",
        "error",
        "kept",
        "kind",
        "name",
        "parent",
        "parent_id",
        "pending",
        "span_id",
        "start_ns",
        "trace_id",
    )
    sampled = False
    deferred = True

    def __init__(
        self,
        name: str,
        trace_id: int,
        parent_id: int,
        parent: "Deferred | None",
        kind: SpanKind,
        attributes: dict[str, Any] | None,
        start_ns: int | None,
        carried: Carried | None,
    ):
        self.trace_id = trace_id
        self.span_id = _ids.getrandbits(64) or 1
        self.parent_id = parent_id
        self.parent = parent  # the deferred span above it in this process, if any
        self.name = name
        self.kind = kind
        self.start_ns = time.time_ns() if start_ns is None else start_ns
        self.attributes: dict[str, Any] = attributes if attributes is not None else {}
        self.carried = carried
        self.error = ""
        self.kept: bool = parent is not None and parent.kept
        self.end_ns = 0
        # spans finished under it before its decision: recorded children, and deferred ones
        # that ended first (an attempt before its invocation), exported with it if it is kept
        self.pending: list[Span | Deferred] | None = None

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def add_event(
        self, name: str, attributes: Mapping[str, Any] | None = None, at_ns: int | None = None
    ) -> None:
        pass  # events come from spans recorded whole (Tracer.record), never a deferred one's own

    def set_error(self, message: str) -> None:
        self.error = message
        self.keep()

    def keep(self) -> None:
        span: Deferred | None = self
        while span is not None and not span.kept:
            span.kept = True
            span = span.parent

    def traceparent(self) -> str:
        # kept already (an attempt after a failed one): the next hop keeps its part too
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{'01' if self.kept else '00'}"

    def hold(self, child: "Span | Deferred") -> bool:
        """Keep `child` until this span's decision (False: it holds MAX_PENDING already)."""
        if self.pending is None:
            self.pending = []
        elif len(self.pending) >= MAX_PENDING:
            return False
        self.pending.append(child)
        return True

    def built(self, end_ns: int) -> Span:
        span = Span(
            self.name,
            self.trace_id,
            self.parent_id,
            True,
            self.kind,
            self.attributes,
            self.start_ns,
            self.carried,
        )
        span.span_id, span.error, span.end_ns = self.span_id, self.error, end_ns
        return span


Context = Span | Unsampled | Deferred  # what the current span may be
NO_SPAN = NoSpan()
_current: contextvars.ContextVar["Context | None"] = contextvars.ContextVar("hetfaas_span", default=None)


def current_context() -> "Context | None":
    """The current span, recording or not: what the next hop's `traceparent` continues."""
    return _current.get()


def current_span() -> "Span | Deferred | None":
    """The current span if it records or may (None for none, or an unsampled one)."""
    span = _current.get()
    return None if span is None or type(span) is Unsampled else span  # type: ignore[return-value]


def recording(span: object) -> bool:
    """Whether children recorded under `span` will be exported: it is sampled, or deferred and
    kept already."""
    kind = type(span)
    return kind is Span or (kind is Deferred and span.kept)  # type: ignore[attr-defined]


def headers(span: Context, using: Propagators) -> dict[str, str]:
    """The NATS headers that continue `span`'s trace on the next hop."""
    undecided = type(span) is Deferred and not span.kept
    return propagation.inject(span.traceparent(), undecided, span.carried, using)


class Tracer:
    """One per process: starts spans, finishes them into the exporter."""

    def __init__(self, exporter: "BatchExporter", sampler: Sampler, using: Propagators | None = None):
        self.exporter = exporter
        self._sample = sampler
        self.propagators = using or propagation.propagators_from_env()

    def start(
        self,
        name: str,
        parent: Mapping[str, str] | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: dict[str, Any] | None = None,
        start_ns: int | None = None,
        deferrable: bool = False,
    ) -> Context:
        """A span under `parent` (incoming headers), else under the current span, else a new
        trace. `deferrable`: an invocation's, whose decision may wait for its outcome."""
        remote = propagation.extract(parent, self.propagators) if parent else None
        local: Context | None = None
        if remote is not None:
            trace_id, parent_id, carried = remote.trace_id, remote.span_id, remote.carried
            decision = self._sample(trace_id, remote.decision, deferrable)
        elif (local := _current.get()) is not None:
            trace_id, parent_id, carried = local.trace_id, local.span_id, local.carried
            decision = SAMPLE if local.sampled else DEFER if local.deferred else 0
        else:
            trace_id, parent_id, carried = _ids.getrandbits(128) or 1, 0, None
            decision = self._sample(trace_id, None, deferrable)
        if decision == SAMPLE:
            return Span(name, trace_id, parent_id, True, kind, attributes, start_ns, carried)
        if decision == DEFER:
            above = local if type(local) is Deferred else None
            return Deferred(name, trace_id, parent_id, above, kind, attributes, start_ns, carried)
        return Unsampled(trace_id, parent_id or _ids.getrandbits(64) or 1, carried)

    def finish(self, span: Context, end_ns: int | None = None) -> None:
        if type(span) is Span:
            span.end_ns = time.time_ns() if end_ns is None else end_ns
            self.exporter.add(span)
        elif type(span) is Deferred:
            span.end_ns = time.time_ns() if end_ns is None else end_ns
            if span.kept:
                self._export_kept(span)
            elif span.parent is not None and not span.parent.end_ns:
                span.parent.hold(span)  # decided with its parent, which is still open
            # else: forgotten, and nothing was built

    def _export_kept(self, span: Deferred) -> None:
        self.exporter.add(span.built(span.end_ns))
        pending, span.pending = span.pending or [], None
        for child in pending:
            if type(child) is Deferred:
                self._export_kept(child)
            else:
                self.exporter.add(child)  # type: ignore[arg-type]

    def record(
        self,
        name: str,
        parent: Span | Deferred,
        start_ns: int,
        end_ns: int,
        attributes: dict[str, Any] | None = None,
        events: Sequence[tuple[str, int, Mapping[str, Any]]] | None = None,
    ) -> Span | None:
        """A finished child of `parent` for something already timed (a phase of a cold start),
        with `events` (name, time, attributes) already known. Under a deferred parent it waits
        for the parent's decision (None: the parent has MAX_PENDING waiting already)."""
        child = Span(
            name,
            parent.trace_id,
            parent.span_id,
            True,
            SpanKind.INTERNAL,
            attributes,
            start_ns,
            parent.carried,
        )
        if events:
            child.events.extend(events)
        child.end_ns = end_ns
        return child if self.add_child(parent, child) else None

    def add_child(self, parent: Span | Deferred, child: Span) -> bool:
        """Export a finished child of `parent`, or hold it for a deferred parent's decision
        (False: held too many already, dropped)."""
        if type(parent) is Deferred and not parent.kept:
            return parent.hold(child)
        self.exporter.add(child)
        return True

    def shutdown(self) -> None:
        self.exporter.shutdown()


class Scope:
    """`with tracer_scope:` makes the span current and finishes it on the way out."""

    __slots__ = ("_token", "_tracer", "span")

    def __init__(self, tracer: Tracer, span: Context):
        self._tracer = tracer
        self.span = span

    def __enter__(self) -> Context:
        self._token = _current.set(self.span)
        return self.span

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        _current.reset(self._token)
        if exc is not None and not getattr(self.span, "error", "x"):
            self.span.set_error(f"{type(exc).__name__}: {exc}")
        self._tracer.finish(self.span)


class Within:
    """`with Within(span):` makes a span current for a while without finishing it (a span opened
    on one path and finished in a callback)."""

    __slots__ = ("_token", "span")

    def __init__(self, span: "Context | None"):
        self.span = span

    def __enter__(self) -> "Context | None":
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
