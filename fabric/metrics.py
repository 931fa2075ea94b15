"""Metrics for every service: counters, histograms and gauges, served to Prometheus on a scrape
endpoint and pushed over OTLP/HTTP (JSON) when an OTLP endpoint is set.

Small and in-house for the same reason as the tracer: the OpenTelemetry SDK costs 12-14 µs per
recorded value here, and a warm invocation records several. Recording is a dict lookup and an
addition; the formats (Prometheus text 0.0.4, OTLP metrics) are produced only when asked.
"""

import bisect
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from fabric import otlp, otlp_proto

log = logging.getLogger(__name__)
_json = msgspec.json.Encoder()
Labels = tuple[str, ...]

# Seconds, from a warm call's fraction of a millisecond to a slow cold start.
DURATION_BOUNDS_S = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)  # fmt: skip
# The unit's word in a Prometheus name, as OpenTelemetry's Prometheus exporters write it.
UNIT_SUFFIXES = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "1": ""}
# Label sets one instrument keeps (OpenTelemetry's default cardinality limit): names come from
# tenants' deployments, so past it values add up under one set whose labels all say OVERFLOW.
MAX_SERIES = 2000
OVERFLOW = "_overflow"


def _bounded(values: dict, labels: Labels) -> Labels:
    if labels in values or len(values) < MAX_SERIES:
        return labels
    return (OVERFLOW,) * len(labels)


@dataclass
class Counter:
    name: str
    description: str
    label_names: tuple[str, ...]
    unit: str = "1"
    values: dict[Labels, float] = field(default_factory=dict)

    def add(self, labels: Labels, amount: float = 1.0) -> None:
        values = self.values
        if labels not in values:
            labels = _bounded(values, labels)
        values[labels] = values.get(labels, 0.0) + amount


@dataclass
class Histogram:
    name: str
    description: str
    label_names: tuple[str, ...]
    unit: str = "s"
    bounds: tuple[float, ...] = DURATION_BOUNDS_S
    buckets: dict[Labels, list[int]] = field(default_factory=dict)  # per bound, and one past the last
    sums: dict[Labels, float] = field(default_factory=dict)

    def record(self, labels: Labels, value: float) -> None:
        counts = self.buckets.get(labels)
        if counts is None:
            labels = _bounded(self.buckets, labels)
            counts = self.buckets.get(labels)
            if counts is None:
                counts = self.buckets[labels] = [0] * (len(self.bounds) + 1)
                self.sums[labels] = 0.0
        counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sums[labels] += value


@dataclass
class Gauge:
    """Read when collected: `read()` gives the current value per label set."""

    name: str
    description: str
    label_names: tuple[str, ...]
    read: Callable[[], Mapping[Labels, float]]
    unit: str = "1"
    monotonic: bool = False  # a running total kept elsewhere: exposed as a counter


class Registry:
    def __init__(self) -> None:
        self.instruments: dict[str, Counter | Histogram | Gauge] = {}
        self.started_ns = time.time_ns()

    def counter(self, name: str, description: str, label_names: tuple[str, ...], unit: str = "1") -> Counter:
        return self._add(Counter(name, description, label_names, unit))

    def histogram(
        self,
        name: str,
        description: str,
        label_names: tuple[str, ...],
        unit: str = "s",
        bounds: tuple[float, ...] = DURATION_BOUNDS_S,
    ) -> Histogram:
        return self._add(Histogram(name, description, label_names, unit, bounds))

    def gauge(
        self,
        name: str,
        description: str,
        label_names: tuple[str, ...],
        read: Callable[[], Mapping[Labels, float]],
        monotonic: bool = False,
        unit: str = "1",
    ) -> Gauge:
        return self._add(Gauge(name, description, label_names, read, unit, monotonic))

    def _add(self, instrument: Any) -> Any:
        existing = self.instruments.get(instrument.name)
        if existing is not None:
            return existing  # one instrument per name, however many callers ask
        self.instruments[instrument.name] = instrument
        return instrument

    # --- Prometheus text exposition (0.0.4) ---

    def prometheus(self) -> str:
        lines: list[str] = []
        for inst in self.instruments.values():
            name = prometheus_name(inst)
            if isinstance(inst, Counter):
                lines += [f"# HELP {name}_total {inst.description}", f"# TYPE {name}_total counter"]
                lines += [f"{name}_total{_labels(inst.label_names, k)} {v:g}" for k, v in inst.values.items()]
            elif isinstance(inst, Histogram):
                lines += [f"# HELP {name} {inst.description}", f"# TYPE {name} histogram"]
                for k, counts in inst.buckets.items():
                    running = 0
                    for bound, count in zip([*inst.bounds, float("inf")], counts, strict=True):
                        running += count
                        le = "+Inf" if bound == float("inf") else f"{bound:g}"
                        lines.append(f"{name}_bucket{_labels((*inst.label_names, 'le'), (*k, le))} {running}")
                    lines.append(f"{name}_sum{_labels(inst.label_names, k)} {inst.sums[k]:g}")
                    lines.append(f"{name}_count{_labels(inst.label_names, k)} {running}")
            else:
                kind, name = ("counter", f"{name}_total") if inst.monotonic else ("gauge", name)
                lines += [f"# HELP {name} {inst.description}", f"# TYPE {name} {kind}"]
                lines += [f"{name}{_labels(inst.label_names, k)} {v:g}" for k, v in _read(inst).items()]
        return "\n".join(lines) + "\n"

    # --- OTLP/JSON (ExportMetricsServiceRequest) ---

    def otlp(self, service: str) -> dict:
        now, start = str(time.time_ns()), str(self.started_ns)
        metrics = []
        for inst in self.instruments.values():
            base = {"name": inst.name, "description": inst.description, "unit": inst.unit}
            if isinstance(inst, Counter):
                points = [_point(inst.label_names, k, start, now, asDouble=v) for k, v in inst.values.items()]
                metrics.append(
                    {**base, "sum": {"dataPoints": points, "aggregationTemporality": 2, "isMonotonic": True}}
                )
            elif isinstance(inst, Histogram):
                points = [
                    _point(
                        inst.label_names,
                        k,
                        start,
                        now,
                        count=str(sum(counts)),
                        sum=inst.sums[k],
                        bucketCounts=[str(c) for c in counts],
                        explicitBounds=list(inst.bounds),
                    )
                    for k, counts in inst.buckets.items()
                ]
                metrics.append({**base, "histogram": {"dataPoints": points, "aggregationTemporality": 2}})
            else:
                points = [_point(inst.label_names, k, start, now, asDouble=v) for k, v in _read(inst).items()]
                if inst.monotonic:
                    metrics.append(
                        {
                            **base,
                            "sum": {"dataPoints": points, "aggregationTemporality": 2, "isMonotonic": True},
                        }
                    )
                else:
                    metrics.append({**base, "gauge": {"dataPoints": points}})
        resource = {
            "attributes": [
                {"key": k, "value": {"stringValue": v}} for k, v in otlp.resource_attributes(service).items()
            ]
        }
        return {
            "resourceMetrics": [
                {"resource": resource, "scopeMetrics": [{"scope": {"name": "hetfaas"}, "metrics": metrics}]}
            ]
        }


def prometheus_name(inst: Counter | Histogram | Gauge) -> str:
    """The name before any `_total`: dots as underscores, then the unit's word (an unknown unit,
    such as "{invocation}", adds none)."""
    name = inst.name.replace(".", "_")
    suffix = UNIT_SUFFIXES.get(inst.unit, "")
    return f"{name}_{suffix}" if suffix and not name.endswith(f"_{suffix}") else name


def _read(gauge: Gauge) -> Mapping[Labels, float]:
    try:
        return gauge.read()
    except Exception as exc:  # a gauge that cannot be read must not break the scrape
        log.warning("gauge %s: %s", gauge.name, exc)
        return {}


def _labels(names: tuple[str, ...], values: Labels) -> str:
    if not names:
        return ""
    pairs = ",".join(f'{n.replace(".", "_")}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True))
    return "{" + pairs + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _point(names: tuple[str, ...], values: Labels, start: str, now: str, **fields: Any) -> dict:
    attributes = [{"key": n, "value": {"stringValue": str(v)}} for n, v in zip(names, values, strict=True)]
    return {"attributes": attributes, "startTimeUnixNano": start, "timeUnixNano": now, **fields}


REGISTRY = Registry()  # one per process, like the tracer


class OtlpPusher:
    """Pushes every OTEL_METRIC_EXPORT_INTERVAL ms (default 60 000) to the OTLP endpoint."""

    def __init__(
        self,
        service: str,
        write: Callable[[bytes], None],
        registry: Registry = REGISTRY,
        protocol: str = "json",
    ):
        self._service = service
        self._write = write
        self._protobuf = protocol == "protobuf"
        self._registry = registry
        self._interval_s = int(os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", "60000")) / 1000
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"metric-export-{service}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.push()

    def push(self) -> None:
        try:
            body = self._registry.otlp(self._service)
            self._write(otlp_proto.encode_metrics(body) if self._protobuf else _json.encode(body))
        except Exception as exc:  # the collector is down: try again next interval
            log.warning("could not export metrics: %s", exc)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.push()
