"""OpenTelemetry setup and W3C trace-context propagation through NATS headers.

Export: OTLP over HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is set (the standard variable), otherwise
OTLP-JSON lines (one ExportTraceServiceRequest per line) into `<state_dir>/traces/<service>.jsonl`.
With tracing off, `span()` hands out one shared no-op context and `trace_headers()` returns None,
so the hot path pays no span objects, no context switches and no NATS headers.
"""

import contextlib
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()
_json = msgspec.json.Encoder()
_NOOP = contextlib.nullcontext(trace.INVALID_SPAN)
_tracer: trace.Tracer | None = None  # set by setup_tracing; None means tracing is off


def setup_tracing(service_name: str, state_dir: str | None, enabled: bool) -> TracerProvider | None:
    """Install this process's tracer provider; returns it so the caller can flush it on exit."""
    global _tracer
    if not enabled:
        return None
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter: SpanExporter = OTLPSpanExporter()
    elif state_dir:
        exporter = JsonLinesSpanExporter(Path(state_dir) / "traces" / f"{service_name}.jsonl")
    else:
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _tracer = provider.get_tracer("hetfaas")
    return provider


def span(
    name: str,
    *,
    parent: Mapping[str, str] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: dict[str, Any] | None = None,
):
    """Start a span, continuing the trace in `parent` (incoming NATS headers) when it has one."""
    if _tracer is None:
        return _NOOP
    context = _propagator.extract(parent) if parent and "traceparent" in parent else None
    return _tracer.start_as_current_span(name, context=context, kind=kind, attributes=attributes)


def enabled() -> bool:
    """Whether this process records spans (callers skip building span data when not)."""
    return _tracer is not None


def trace_headers() -> dict[str, str] | None:
    """NATS headers carrying the current span (`traceparent`), or None when there is nothing to carry."""
    if _tracer is None:
        return None
    headers: dict[str, str] = {}
    _propagator.inject(headers)
    return headers or None


class JsonLinesSpanExporter(SpanExporter):
    """Appends spans as OTLP-JSON lines, encoded directly (no protobuf round trip on the way)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        line = _json.encode(otlp_json(spans)) + b"\n"
        with self._lock, open(self._path, "ab") as out:
            out.write(line)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def otlp_json(spans: Sequence[ReadableSpan]) -> dict:
    """An ExportTraceServiceRequest in the OTLP/JSON encoding (hex ids, integer enums)."""
    by_resource: dict[int, tuple[Any, dict[tuple[str, str], list[dict]]]] = {}
    for s in spans:
        _, scopes = by_resource.setdefault(id(s.resource), (s.resource, {}))
        scope = s.instrumentation_scope
        key = (scope.name, scope.version or "") if scope else ("", "")
        scopes.setdefault(key, []).append(_span(s))
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": _attributes(resource.attributes)},
                "scopeSpans": [
                    {"scope": {"name": name, "version": version}, "spans": encoded}
                    for (name, version), encoded in scopes.items()
                ],
            }
            for resource, scopes in by_resource.values()
        ]
    }


def _span(s: ReadableSpan) -> dict:
    out: dict[str, Any] = {
        "traceId": format(s.context.trace_id, "032x"),
        "spanId": format(s.context.span_id, "016x"),
        "name": s.name,
        "kind": s.kind.value + 1,  # the SDK counts from INTERNAL=0; OTLP from UNSPECIFIED=0
        "startTimeUnixNano": str(s.start_time),
        "endTimeUnixNano": str(s.end_time),
        "attributes": _attributes(s.attributes or {}),
        "status": {"code": s.status.status_code.value},
    }
    if s.parent is not None:
        out["parentSpanId"] = format(s.parent.span_id, "016x")
    if s.status.description:
        out["status"]["message"] = s.status.description
    if s.events:
        out["events"] = [
            {"name": e.name, "timeUnixNano": str(e.timestamp), "attributes": _attributes(e.attributes or {})}
            for e in s.events
        ]
    return out


def _attributes(attributes: Mapping[str, Any]) -> list[dict]:
    return [{"key": k, "value": _value(v)} for k, v in attributes.items()]


def _value(v: Any) -> dict:
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v}
    if isinstance(v, list | tuple):
        return {"arrayValue": {"values": [_value(x) for x in v]}}
    return {"stringValue": str(v)}
