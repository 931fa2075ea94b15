"""OTLP's protobuf encoding (`http/protobuf`, the collector's default), from OpenTelemetry's own
generated messages (opentelemetry-proto): the same spans and metrics as fabric/otlp.py writes
as JSON. Ids are bytes here, times fixed64, where the JSON mapping has hex and strings."""

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from fabric import otlp

if TYPE_CHECKING:
    from fabric.tracing import Span as FinishedSpan

_SCOPE = InstrumentationScope(name="hetfaas")


def value(v: Any) -> AnyValue:
    if type(v) is str:
        return AnyValue(string_value=v)
    if type(v) is bool:
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v) if -(1 << 63) <= v < (1 << 63) else AnyValue(string_value=str(v))
    if isinstance(v, float):
        return AnyValue(double_value=v)
    if isinstance(v, list | tuple):
        return AnyValue(array_value=ArrayValue(values=[value(x) for x in v]))
    return AnyValue(string_value=str(v))


def key_values(items: Mapping[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=value(v)) for k, v in items.items()]


def span(s: "FinishedSpan") -> Span:
    encoded = Span(
        trace_id=s.trace_id.to_bytes(16, "big"),
        span_id=s.span_id.to_bytes(8, "big"),
        name=s.name,
        kind=int(s.kind),  # type: ignore[arg-type]  # OTLP's numbering, as SpanKind's
        start_time_unix_nano=s.start_ns,
        end_time_unix_nano=s.end_ns,
        attributes=key_values(otlp.span_attributes(s)),
        status=Status(code=Status.STATUS_CODE_ERROR, message=s.error) if s.error else None,
    )
    if s.parent_id:
        encoded.parent_span_id = s.parent_id.to_bytes(8, "big")
    if s.carried is not None and s.carried.tracestate:
        encoded.trace_state = s.carried.tracestate
    for name, at, attrs in s.events:
        encoded.events.add(time_unix_nano=at, name=name, attributes=key_values(attrs))
    return encoded


def encode_spans(resource: Mapping[str, str], spans: Iterable["FinishedSpan"]) -> bytes:
    """One ExportTraceServiceRequest."""
    scope_spans = ScopeSpans(scope=_SCOPE, spans=[span(s) for s in spans])
    resource_spans = ResourceSpans(
        resource=Resource(attributes=key_values(resource)), scope_spans=[scope_spans]
    )
    return ExportTraceServiceRequest(resource_spans=[resource_spans]).SerializeToString()


def encode_metrics(otlp_json: dict) -> bytes:
    """An ExportMetricsServiceRequest from its OTLP/JSON form (fabric/metrics.py's `otlp`): the
    metrics mapping has no ids, so protobuf's own JSON reading gives the same message."""
    return json_format.ParseDict(otlp_json, ExportMetricsServiceRequest()).SerializeToString()
