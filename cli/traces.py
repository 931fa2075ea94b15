"""Reading the cluster's traces back: OTLP-JSON lines from the state directory, one invocation's
trace as a waterfall, and a summary of cold starts by phase. Pure apart from reading files."""

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHOWN_ATTRIBUTES = (
    "hetfaas.node",
    "hetfaas.attempt",
    "faas.coldstart",
    "hetfaas.pool_mode",
    "hetfaas.start_path",
    "hetfaas.shard",
    "hetfaas.slot_reused",
    "hetfaas.prewarmed",
    "hetfaas.waited_for",
    "hetfaas.placement",
    "hetfaas.action",
    "hetfaas.error",
)


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    service: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    error: str = ""
    events: list[dict] = field(default_factory=list)
    children: list["Span"] = field(default_factory=list)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def read_spans(traces_dir: Path) -> list[Span]:
    """Every span in the directory's `*.jsonl` files (ExportTraceServiceRequest per line)."""
    spans: list[Span] = []
    for path in sorted(traces_dir.glob("*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                spans.extend(_decode(json.loads(line)))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash: skip it, keep the rest
    return spans


def decode_batches(bodies: Iterable[bytes]) -> list[Span]:
    """The spans in OTLP-JSON batches (a planned cluster's trace stream: fabric.trace_stream)."""
    spans: list[Span] = []
    for body in bodies:
        try:
            spans.extend(_decode(json.loads(body)))
        except (ValueError, KeyError, TypeError):
            continue  # a batch that is not one: skip it, keep the rest
    return spans


def _decode(request: dict) -> Iterator[Span]:
    for resource_spans in request["resourceSpans"]:
        resource = _attributes(resource_spans.get("resource", {}).get("attributes", []))
        service = str(resource.get("service.name", "?"))
        for scope in resource_spans.get("scopeSpans", []):
            for s in scope.get("spans", []):
                status = s.get("status", {})
                yield Span(
                    trace_id=s["traceId"],
                    span_id=s["spanId"],
                    parent_id=s.get("parentSpanId", ""),
                    name=s["name"],
                    service=service,
                    start_ns=int(s["startTimeUnixNano"]),
                    end_ns=int(s["endTimeUnixNano"]),
                    attributes=_attributes(s.get("attributes", [])),
                    error=status.get("message", "error") if status.get("code") == 2 else "",
                    events=s.get("events", []),
                )


def _attributes(items: list[dict]) -> dict[str, Any]:
    out = {}
    for item in items:
        (kind, value), *_ = item["value"].items()
        out[item["key"]] = int(value) if kind == "intValue" else value
    return out


def trace_of(spans: Iterable[Span], invocation_id: str) -> list[Span]:
    """The spans of the trace an invocation belongs to (found by `faas.invocation_id`)."""
    spans = list(spans)
    trace_ids = {s.trace_id for s in spans if s.attributes.get("faas.invocation_id") == invocation_id}
    return sorted((s for s in spans if s.trace_id in trace_ids), key=lambda s: (s.start_ns, s.name))


def tree(spans: list[Span]) -> list[Span]:
    """The roots, each span's children attached in time order. A span whose parent was not
    exported (a client that does not trace) is a root."""
    by_id = {s.span_id: s for s in spans}
    for s in spans:
        s.children = []
    roots: list[Span] = []
    for s in spans:
        parent = by_id.get(s.parent_id)
        (parent.children if parent is not None else roots).append(s)
    return roots


def waterfall(spans: list[Span], width: int = 40) -> str:
    """One line per span: the tree, where it ran, how long, a bar placing it in time, and the
    attributes that explain it."""
    if not spans:
        return ""
    start = min(s.start_ns for s in spans)
    total = max(max(s.end_ns for s in spans) - start, 1)
    lines = [f"trace {spans[0].trace_id}  {total / 1e6:.2f} ms"]

    def walk(span: Span, depth: int) -> None:
        first = round((span.start_ns - start) / total * width)
        length = max(1, round((span.end_ns - span.start_ns) / total * width))
        bar = " " * first + "█" * min(length, width - first)
        label = f"{'  ' * depth}{span.name}"
        notes = [f"{k.split('.', 1)[1]}={v}" for k, v in span.attributes.items() if k in SHOWN_ATTRIBUTES]
        if span.error:
            notes.append(f"ERROR: {span.error}")
        lines.append(
            f"{label:<30} {span.service:<13} {span.duration_ms:>9.3f} ms |{bar:<{width}}| {' '.join(notes)}"
        )
        for event in span.events:  # kernel tracepoint hits: points in time
            at = int(event.get("timeUnixNano", span.start_ns))
            mark = " " * min(width - 1, max(0, round((at - start) / total * width))) + "▏"
            attrs = " ".join(f"{k}={v}" for k, v in _attributes(event.get("attributes", [])).items())
            name = f"{'  ' * (depth + 1)}• {str(event.get('name', '?')).removeprefix('kernel.')}"
            offset = "@" + format((at - start) / 1e6, ".3f")
            lines.append(f"{name:<30} {'':<13} {offset:>9} ms |{mark:<{width}}| {attrs}")
        for child in sorted(span.children, key=lambda c: c.start_ns):
            walk(child, depth + 1)

    for root in tree(spans):
        walk(root, 0)
    return "\n".join(lines)


def span_json(span: Span) -> dict:
    return {
        "trace_id": span.trace_id,
        "span_id": span.span_id,
        "parent_span_id": span.parent_id or None,
        "name": span.name,
        "service": span.service,
        "start_unix_ns": span.start_ns,
        "duration_ms": round(span.duration_ms, 3),
        "attributes": span.attributes,
        "error": span.error or None,
        "events": span.events,  # as exported: OTLP's {name, timeUnixNano, attributes: [KeyValue]}
    }


# --- cold starts ---------------------------------------------------------------------------------


@dataclass
class ColdStarts:
    """Cold starts of one pool mode and start path: end-to-end node time and each phase, in ms."""

    count: int = 0
    total_ms: list[float] = field(default_factory=list)
    phases_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


def cold_starts(
    spans: list[Span], function: str | None = None, since_ns: int = 0
) -> dict[tuple[str, str], ColdStarts]:
    """Per (pool mode, start path), the cold starts' node spans and their phases."""
    children: defaultdict[str, list[Span]] = defaultdict(list)
    for s in spans:
        children[s.parent_id].append(s)
    summary: dict[tuple[str, str], ColdStarts] = {}
    for node in spans:
        attrs = node.attributes
        if node.name != "node.invoke" or attrs.get("faas.coldstart") is not True or node.start_ns < since_ns:
            continue
        if function is not None and attrs.get("faas.name") != function:
            continue
        mode = str(attrs.get("hetfaas.pool_mode", "dpu" if "hetfaas.program" in attrs else "?"))
        entry = summary.setdefault((mode, str(attrs.get("hetfaas.start_path", "-"))), ColdStarts())
        entry.count += 1
        entry.total_ms.append(node.duration_ms)
        for phase in _descendants(node, children):
            entry.phases_ms[phase.name].append(phase.duration_ms)
    return summary


def _descendants(span: Span, children: dict[str, list[Span]]) -> Iterator[Span]:
    for child in children.get(span.span_id, []):
        yield child
        yield from _descendants(child, children)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def cold_start_rows(summary: dict[tuple[str, str], ColdStarts]) -> list[dict]:
    """One row per (pool mode, start path, phase): count, p50, p99, and its share of those cold
    starts' time. The start path says how the instance came: fresh, stem_cell ("-": not said)."""
    rows = []
    for (mode, path), entry in sorted(summary.items()):
        total = sum(entry.total_ms) or 1.0
        rows.append(_row(mode, path, "node.invoke (whole start)", entry.total_ms, total))
        for phase, values in sorted(entry.phases_ms.items(), key=lambda kv: -sum(kv[1])):
            rows.append(_row(mode, path, phase, values, total))
    return rows


def _row(mode: str, path: str, phase: str, values: list[float], total: float) -> dict:
    return {
        "pool_mode": mode,
        "start_path": path,
        "phase": phase,
        "count": len(values),
        "p50_ms": round(statistics.median(values), 3),
        "p99_ms": round(percentile(values, 99), 3),
        "share": round(sum(values) / total, 3),
    }
