"""W3C trace context and baggage in NATS headers, as OTEL_PROPAGATORS says (`tracecontext`,
`baggage`; the default is both).

`traceparent` names the caller's span and its decision; `tracestate` carries other vendors'
members through unchanged, plus ours (`hetfaas=defer`) on a deferred trace (fabric/sampling.py);
`baggage` is carried through too, and its entries become attributes of the spans that carry it
(as OpenTelemetry's BaggageSpanProcessor does). Both come from callers, tenants included: each
is bounded by what W3C lets a receiver drop (tracestate: 32 members, 512 characters kept;
baggage: 8192 bytes, 180 members), and what is over is dropped, never the request.
"""

import logging
import os
import urllib.parse
from collections.abc import Mapping
from typing import NamedTuple

from fabric.sampling import DEFER, DROP, SAMPLE

log = logging.getLogger(__name__)

OUR_MEMBER = "hetfaas=defer"
MAX_TRACESTATE_CHARS, MAX_TRACESTATE_MEMBERS = 512, 32
MAX_BAGGAGE_BYTES, MAX_BAGGAGE_MEMBERS = 8192, 180


class Carried(NamedTuple):
    """What a trace carries on from its caller, unchanged: others' tracestate, the baggage."""

    tracestate: str = ""
    baggage: str = ""


class Remote(NamedTuple):
    trace_id: int
    span_id: int
    decision: int  # DROP, SAMPLE or DEFER
    carried: Carried | None


class Propagators(NamedTuple):
    tracecontext: bool
    baggage: bool


def propagators_from_env(environ: Mapping[str, str] = os.environ) -> Propagators:
    names = {n.strip().lower() for n in environ.get("OTEL_PROPAGATORS", "tracecontext,baggage").split(",")}
    unknown = names - {"tracecontext", "baggage", "none", ""}
    if unknown:
        log.warning("OTEL_PROPAGATORS: %s not supported here, ignored", ", ".join(sorted(unknown)))
    return Propagators("tracecontext" in names, "baggage" in names)


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


def extract(headers: Mapping[str, str], using: Propagators) -> Remote | None:
    """The caller's span from a message's headers, or None (no trace context, or a malformed one)."""
    if not using.tracecontext or (value := headers.get("traceparent")) is None:
        return None
    parsed = parse_traceparent(value)
    if parsed is None:
        return None
    trace_id, span_id, sampled = parsed
    state = headers.get("tracestate", "")
    deferred = False
    if state == OUR_MEMBER:  # the common case inside the cluster: nothing else to carry
        state, deferred = "", True
    elif state:
        state, deferred = _others_tracestate(state)
    baggage = headers.get("baggage", "") if using.baggage else ""
    if len(baggage) > MAX_BAGGAGE_BYTES:
        baggage = ""
    carried = Carried(state, baggage) if state or baggage else None
    decision = SAMPLE if sampled else DEFER if deferred else DROP
    return Remote(trace_id, span_id, decision, carried)


def _others_tracestate(state: str) -> tuple[str, bool]:
    """(others' members, bounded; whether ours said deferred)."""
    members = [m.strip() for m in state.split(",", MAX_TRACESTATE_MEMBERS + 1) if m.strip()]
    deferred = OUR_MEMBER in members
    kept = [m for m in members[:MAX_TRACESTATE_MEMBERS] if not m.startswith("hetfaas=")]
    text = ",".join(kept)
    return (text if len(text) <= MAX_TRACESTATE_CHARS else ""), deferred


def inject(traceparent: str, deferred: bool, carried: Carried | None, using: Propagators) -> dict[str, str]:
    """The headers that continue a span's trace on the next hop."""
    if not using.tracecontext:
        return {}
    headers = {"traceparent": traceparent}
    if carried is None:
        if deferred:
            headers["tracestate"] = OUR_MEMBER
        return headers
    state = ",".join(filter(None, (OUR_MEMBER if deferred else "", carried.tracestate)))
    if state:
        headers["tracestate"] = state
    if carried.baggage and using.baggage:
        headers["baggage"] = carried.baggage
    return headers


def baggage_entries(baggage: str) -> dict[str, str]:
    """A `baggage` header's entries (properties after ';' dropped), at most MAX_BAGGAGE_MEMBERS."""
    entries: dict[str, str] = {}
    for member in baggage.split(",", MAX_BAGGAGE_MEMBERS)[:MAX_BAGGAGE_MEMBERS]:
        key, sep, value = member.partition(";")[0].partition("=")
        key = key.strip()
        if sep and key:
            entries[urllib.parse.unquote(key)] = urllib.parse.unquote(value.strip())
    return entries
