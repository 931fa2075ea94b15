"""A handler's own OpenTelemetry spans, carried to the node (imported by python_worker.py only
when the function's code or layer has the OpenTelemetry SDK). The sandbox has no network: the
worker installs a tracer provider whose exporter keeps finished spans, and sends those of each
invocation to the node in one SPANS frame before its answer; the node checks them and exports
them with its own (host_node/handler_spans.py). A handler joins the invocation's trace by
starting its spans under `context.traceparent`. Stdlib only, but for the SDK it finds.
"""

import json

MAX_SPANS = 64  # per invocation; the node refuses more
MAX_ATTRIBUTES = 32
MAX_TEXT = 256


def install():
    """A function that takes the spans finished since it was last called, as a SPANS body (b""
    when none); None when the SDK cannot be imported (the handler's spans then go nowhere, as
    they would without a provider)."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
    except ImportError:
        return None
    finished: list = []

    class ToNode(SpanExporter):
        def export(self, spans):
            if len(finished) < MAX_SPANS:
                finished.extend(spans[: MAX_SPANS - len(finished)])
            return SpanExportResult.SUCCESS

        def shutdown(self):
            finished.clear()

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ToNode()))
    trace.set_tracer_provider(provider)

    def take() -> bytes:
        if not finished:
            return b""
        spans = [_encoded(span) for span in finished]
        finished.clear()
        return json.dumps(spans, separators=(",", ":")).encode()

    return take


def _encoded(span) -> dict:
    context, parent = span.get_span_context(), span.parent
    attributes: dict[str, object] = {}
    for key, value in list((span.attributes or {}).items())[:MAX_ATTRIBUTES]:
        if isinstance(value, bool | int | float):
            attributes[str(key)[:MAX_TEXT]] = value
        else:
            attributes[str(key)[:MAX_TEXT]] = str(value)[:MAX_TEXT]
    status = span.status
    return {
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else "",
        "name": str(span.name)[:MAX_TEXT],
        "start_ns": int(span.start_time or 0),
        "end_ns": int(span.end_time or 0),
        "attributes": attributes,
        "error": (status.description or "error")[:MAX_TEXT] if status.status_code.name == "ERROR" else "",
    }
