"""A handler's own OpenTelemetry spans (runtimes/worker_spans.py sends them from the sandbox),
checked and exported with the node's, under the node's span of the invocation.

The function is an adversary here too: only spans of the invocation's own trace are taken, each
parented by the node's span or by another span of the same batch (so a function can neither add
to another trace nor hang spans off another service's), at most MAX_SPANS, names and attributes
bounded; the rest are dropped, the call goes on."""

import logging

import msgspec

from fabric import telemetry
from fabric.tracing import Deferred, Span

log = logging.getLogger(__name__)

MAX_SPANS = 64
MAX_TEXT = 256
MAX_ATTRIBUTES = 32


class HandlerSpan(msgspec.Struct, frozen=True, kw_only=True):
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, str | int | float | bool] = {}
    error: str = ""


_decoder = msgspec.json.Decoder(list[HandlerSpan])


def record(node_span: Span | Deferred, body: bytes) -> int:
    """Export the batch's spans that belong under `node_span`; how many were."""
    try:
        spans = _decoder.decode(body)[:MAX_SPANS]
    except msgspec.DecodeError as exc:
        log.warning("a handler's spans were not readable, dropped: %s", exc)
        return 0
    trace_id, node_id = f"{node_span.trace_id:032x}", f"{node_span.span_id:016x}"
    ids = {span.span_id for span in spans if span.trace_id == trace_id and _hex(span.span_id, 16)}
    ids.discard(node_id)
    exported = 0
    for span in spans:
        if span.span_id not in ids or not (span.parent_span_id == node_id or span.parent_span_id in ids):
            continue
        attributes: dict[str, object] = {
            key[:MAX_TEXT]: value[:MAX_TEXT] if isinstance(value, str) else value
            for key, value in list(span.attributes.items())[:MAX_ATTRIBUTES]
        }
        attributes["hetfaas.from_handler"] = True
        end_ns = max(span.end_ns, span.start_ns)
        telemetry.record_given(
            node_span, span.name[:MAX_TEXT], int(span.span_id, 16), int(span.parent_span_id, 16),
            span.start_ns, end_ns, attributes, span.error[:MAX_TEXT],
        )  # fmt: skip
        exported += 1
    return exported


def _hex(text: str, digits: int) -> bool:
    try:
        return len(text) == digits and int(text, 16) > 0
    except ValueError:
        return False
