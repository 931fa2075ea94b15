"""OpenTelemetry setup and W3C trace-context propagation through NATS headers.

Export: OTLP over HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is set (the standard variable), otherwise
OTLP-JSON lines (one ExportTraceServiceRequest per line) into `<state_dir>/traces/<service>.jsonl`.
With tracing disabled no provider is installed, so spans are the API's no-op spans.
"""

import base64
import json
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from google.protobuf.json_format import MessageToDict
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()
_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


class JsonLinesSpanExporter(SpanExporter):
    """Appends spans as OTLP-JSON lines (ids in hex, as the OTLP/JSON spec wants)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        request = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
        for resource_spans in request.get("resourceSpans", []):
            for scope_spans in resource_spans.get("scopeSpans", []):
                for span in scope_spans.get("spans", []):
                    _hex_ids(span)
                    for link in span.get("links", []):
                        _hex_ids(link)
        line = json.dumps(request, separators=(",", ":")) + "\n"
        with self._lock, open(self._path, "a") as out:
            out.write(line)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _hex_ids(obj: dict) -> None:
    for field in _ID_FIELDS:
        if field in obj:
            obj[field] = base64.b64decode(obj[field]).hex()


def setup_tracing(service_name: str, state_dir: str | None, enabled: bool) -> TracerProvider | None:
    """Install the global tracer provider for this process; returns it so the caller can flush it."""
    if not enabled:
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter: SpanExporter = OTLPSpanExporter()
    elif state_dir:
        exporter = JsonLinesSpanExporter(Path(state_dir) / "traces" / f"{service_name}.jsonl")
    else:
        return None
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers(headers: dict[str, str]) -> dict[str, str]:
    """Add `traceparent` for the current span, if it is being recorded."""
    if trace.get_current_span().is_recording():
        _propagator.inject(headers)
    return headers


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context | None:
    if not headers or "traceparent" not in headers:
        return None
    return _propagator.extract(headers)
