"""Tracing for every service: one tracer per process (fabric/tracing.py), W3C trace context and
baggage in NATS headers (fabric/propagation.py), the decision for invocations made late
(fabric/sampling.py).

Export (fabric/span_export.py): OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT (or
..._TRACES_ENDPOINT) is set, in OTEL_EXPORTER_OTLP_PROTOCOL's encoding (http/protobuf by
default, or http/json); otherwise OTLP-JSON lines (one ExportTraceServiceRequest per line) into
`<state_dir>/traces/<service>.jsonl`. With tracing off, `span()` hands out one shared no-op scope
and `trace_headers()` returns None, so the hot path pays no span objects and no NATS headers.
"""

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fabric import sampling, tracing
from fabric.sampling import sampler_from_env
from fabric.span_export import BatchExporter, file_writer, http_writer, protocol_of
from fabric.tracing import (
    NO_SCOPE,
    Context,
    Deferred,
    NoScope,
    NoSpan,
    Scope,
    Span,
    SpanKind,
    Tracer,
    Unsampled,
    Within,
    current_context,
    current_span,
)
from schemas.messages import ErrorReply, InvokeReply

__all__ = [
    "SpanKind",
    "Within",
    "close_span",
    "enabled",
    "headers_of",
    "noted",
    "open_span",
    "record",
    "setup_tracing",
    "span",
    "trace_headers",
]

_tracer: Tracer | None = None  # set by setup_tracing; None means tracing is off


def setup_tracing(
    service_name: str,
    state_dir: str | None,
    enabled: bool,
    stream: Callable[[bytes], None] | None = None,
    sample_all: bool = False,
) -> Tracer | None:
    """Install this process's tracer; returns it so the caller can flush it on exit. Spans go to
    the OTLP endpoint when one is set, else to `stream` (a planned cluster's trace stream), else
    to files in `state_dir`. `sample_all`: this process's roots are sampled whatever
    OTEL_TRACES_SAMPLER says (the hops after it follow: they are parent-based)."""
    global _tracer
    if not enabled:
        return None
    write: Callable[[bytes], None]
    protocol = "json"
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        write, protocol = http_writer(), protocol_of("traces")
    elif stream is not None:
        write = stream
    elif state_dir:
        write = file_writer(Path(state_dir) / "traces" / f"{service_name}.jsonl")
    else:
        return None
    sampler = sampler_from_env({"OTEL_TRACES_SAMPLER": "always_on"} if sample_all else os.environ)
    _tracer = Tracer(BatchExporter(service_name, write, protocol=protocol), sampler)
    return _tracer


def stop_tracing() -> None:
    """Flush and forget this process's tracer (tests start several in one process)."""
    global _tracer
    if _tracer is not None:
        _tracer.shutdown()
        _tracer = None


def span(
    name: str,
    *,
    parent: Mapping[str, str] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: dict[str, Any] | None = None,
    deferrable: bool = False,
) -> Scope | NoScope:
    """`with span(...) as s:` a span under `parent` (incoming NATS headers) when they carry a
    trace, else under the current span, else a new trace. `deferrable`: an invocation's span,
    whose trace may be decided at its end (fabric/sampling.py)."""
    if _tracer is None:
        return NO_SCOPE
    return Scope(_tracer, _tracer.start(name, parent, kind, attributes, deferrable=deferrable))


def open_span(
    name: str,
    *,
    parent: Mapping[str, str] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: dict[str, Any] | None = None,
    deferrable: bool = False,
) -> Context | None:
    """A span started as `span` starts it, but neither current nor finished: for work that ends
    in a callback. `Within(s)` makes it current for a while; `close_span(s)` finishes it.
    None when tracing is off."""
    if _tracer is None:
        return None
    return _tracer.start(name, parent, kind, attributes, deferrable=deferrable)


def close_span(span: Context | None, error: str | None = None) -> None:
    if _tracer is not None and span is not None:
        if error and not isinstance(span, Unsampled) and not span.error:
            span.set_error(error)
        _tracer.finish(span)


R = TypeVar("R")


def noted(span: Span | NoSpan, reply: R) -> R:
    """`reply`, its span marked failed when it is an error reply (a control request's outcome)."""
    if isinstance(reply, ErrorReply):
        span.set_error(f"{reply.error.code}: {reply.error.message}")
    return reply


def keeps(reply: InvokeReply | ErrorReply) -> bool:
    """Whether an invocation's outcome keeps its deferred trace (a cold start, a failure)."""
    return sampling.keeps(isinstance(reply, ErrorReply), isinstance(reply, InvokeReply) and reply.cold_start)


def ended(span: Span | Deferred | NoSpan, reply: InvokeReply | ErrorReply) -> None:
    """An invocation's outcome on its span: an error's code, and kept if the outcome keeps it."""
    if isinstance(reply, ErrorReply):
        span.set_attribute("hetfaas.error", reply.error.code)
        span.keep()
    elif reply.cold_start:
        span.keep()


def keep_current() -> None:
    """The current span's trace is kept (a deferred one: another hop said so)."""
    if (span := current_context()) is not None:
        span.keep()


def headers_of(span: Context | None) -> dict[str, str] | None:
    """The NATS headers that continue `span`'s trace on the next hop."""
    if span is None or _tracer is None:
        return None
    return tracing.headers(span, _tracer.propagators)


def record(
    name: str,
    start_ns: int,
    end_ns: int,
    attributes: dict[str, Any] | None = None,
    parent: Span | Deferred | None = None,
    events: Sequence[tuple[str, int, Mapping[str, Any]]] | None = None,
) -> Span | None:
    """A finished child of `parent` (default: the current span) for something timed already
    (a cold start's phase), with its events (name, time ns, attributes). Under a deferred
    parent it is exported only if the parent is kept."""
    parent = parent or current_span()
    if _tracer is None or parent is None:
        return None
    return _tracer.record(name, parent, start_ns, end_ns, attributes, events)


def record_given(
    parent: Span | Deferred,
    name: str,
    span_id: int,
    parent_id: int,
    start_ns: int,
    end_ns: int,
    attributes: dict[str, Any],
    error: str = "",
) -> None:
    """A finished span in `parent`'s trace whose ids were made elsewhere (a handler's own, sent
    through its node: host_node/handler_spans.py checks them first)."""
    if _tracer is None:
        return
    span = Span(
        name, parent.trace_id, parent_id, True, SpanKind.INTERNAL, attributes, start_ns, parent.carried
    )
    span.span_id, span.error, span.end_ns = span_id, error, max(end_ns, start_ns)
    _tracer.add_child(parent, span)


def current() -> Span | Deferred | None:
    return current_span() if _tracer is not None else None


def enabled() -> bool:
    """Whether this process records spans (callers skip building span data when not)."""
    return _tracer is not None


def trace_headers() -> dict[str, str] | None:
    """NATS headers carrying the current span (`traceparent`, sampled or not), or None when
    there is nothing to carry."""
    if _tracer is None:
        return None
    current = current_context()
    return tracing.headers(current, _tracer.propagators) if current is not None else None
