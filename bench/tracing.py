"""Warm throughput with tracing on against tracing off, in one run.

Two identical local clusters (2 host nodes, 1 scheduler): one with tracing on in every service
(spans exported as OTLP-JSON lines into its state directory, as by default), one with it off.
Rounds alternate between them so drift on a shared machine hits both alike; in the tracing
rounds the benchmark's client traces too (the root span and `traceparent`, as `hetfaas invoke`).
The sampler is the default (warm successes at 10%, decided late; cold starts always), unless
OTEL_TRACES_SAMPLER says otherwise. Targets (issues 6 and 23): on keeps at least 90% of off at
64 in flight, and every cold start the nodes counted is traced.

    .venv/bin/python -m bench.tracing [--requests 3000] [--repeat 3] [--payload 64]
"""

import json
import os
import tempfile
import tomllib
import urllib.request
from pathlib import Path

import uvloop

from bench.warm_invoke import e2e_round, median_round, paired_ratio, prepare, ratio_cell, round_arguments
from deploy import launcher
from fabric import telemetry

MODES = (("sequential", 1), ("in_flight_64", 64))
COLD_STARTS_METRIC = "faas_coldstarts_total{"


def start(work: Path, tracing: bool) -> launcher.ClusterInfo:
    flag = {"tracing": tracing}
    state = work / ("on" if tracing else "off") / "state"
    info = launcher.up(state, hosts=2, schedulers=1, scheduler_overrides=flag, host_overrides=flag)
    uvloop.run(prepare(info, work / ("on" if tracing else "off"), 8, 2))
    return info


def traced_round(info: launcher.ClusterInfo, payload: bytes, requests: int, in_flight: int) -> dict:
    telemetry.setup_tracing("bench-client", info.state_dir, True)
    try:
        return uvloop.run(e2e_round(info, payload, requests, in_flight))
    finally:
        telemetry.stop_tracing()


def spans_written(info: launcher.ClusterInfo) -> dict[str, int]:
    """Spans in the traced cluster's files: all of them, and its nodes' invocation spans, cold
    and warm."""
    counts = {"spans": 0, "node_cold": 0, "node_warm": 0}
    for path in Path(info.state_dir, "traces").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            for rs in json.loads(line)["resourceSpans"]:
                for span in (span for ss in rs["scopeSpans"] for span in ss["spans"]):
                    counts["spans"] += 1
                    if span["name"] == "node.invoke":
                        cold = {"key": "faas.coldstart", "value": {"boolValue": True}} in span["attributes"]
                        counts["node_cold" if cold else "node_warm"] += 1
    return counts


def cold_starts_counted(info: launcher.ClusterInfo) -> int:
    """The cold starts the traced cluster's nodes counted (their Prometheus endpoints)."""
    total = 0
    for config in Path(info.state_dir, "config").glob("host-*.toml"):
        listen = tomllib.loads(config.read_text())["metrics_listen"]
        with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(COLD_STARTS_METRIC):
                    total += int(float(line.rsplit(" ", 1)[1]))
    return total


def run(requests: int, repeat: int, payload_size: int) -> dict:
    payload = os.urandom(payload_size)
    with tempfile.TemporaryDirectory(prefix="hetfaas-bench-") as tmp:
        work = Path(tmp)
        rounds: dict[str, list[dict]] = {f"{k}_{m}": [] for k in ("on", "off") for m, _ in MODES}
        clusters: list[launcher.ClusterInfo] = []
        try:  # whichever cluster started is stopped, even if the other failed to start
            clusters.append(on := start(work, True))
            clusters.append(off := start(work, False))
            for _ in range(repeat):
                for mode, in_flight in MODES:
                    rounds[f"off_{mode}"].append(uvloop.run(e2e_round(off, payload, requests, in_flight)))
                    rounds[f"on_{mode}"].append(traced_round(on, payload, requests, in_flight))
            spans = spans_written(on)
            spans["cold_starts_counted"] = cold_starts_counted(on)
            spans["invocations"] = repeat * len(MODES) * requests
        finally:
            for info in clusters:
                launcher.stop(info)
    ratios = {mode: paired_ratio(rounds[f"off_{mode}"], rounds[f"on_{mode}"]) for mode, _ in MODES}
    cells = {cell: median_round(values) for cell, values in rounds.items()}
    return {"cells": cells, "ratios": ratios, "spans": spans}


def report(results: dict) -> str:
    cells = results["cells"]
    spans = results["spans"]
    lines = [
        f"spans written by the traced cluster: {spans['spans']} for {spans['invocations']} invocations; "
        f"node spans: {spans['node_cold']} cold starts of {spans['cold_starts_counted']} the nodes counted, "
        f"{spans['node_warm']} warm",
        "on/off: the median of the rounds' ratios (each traced round against the untraced round "
        "just before it), with their range",
        "",
        "| mode | off req/s | on req/s | on/off | off p50 / p99 µs | on p50 / p99 µs |",
        "|---|---|---|---|---|---|",
    ]
    for mode, _ in MODES:
        off, on = cells[f"off_{mode}"], cells[f"on_{mode}"]
        lines.append(
            f"| {mode} | {off['req_per_s']} | {on['req_per_s']} | {ratio_cell(results['ratios'][mode])} "
            f"| {off['p50_us']} / {off['p99_us']} | {on['p50_us']} / {on['p99_us']} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = round_arguments(__doc__).parse_args()
    print(report(run(args.requests, args.repeat, args.payload)))


if __name__ == "__main__":
    main()
