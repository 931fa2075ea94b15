"""Warm throughput with tracing on against tracing off, in one run.

Two identical local clusters (2 host nodes, 1 scheduler): one with tracing on in every service
(spans exported as OTLP-JSON lines into its state directory, as by default), one with it off.
Rounds alternate between them so drift on a shared machine hits both alike; in the tracing
rounds the benchmark's client traces too (the root span and `traceparent`, as `hetfaas invoke`).
Target (issue 6): on keeps at least 90% of off.

    .venv/bin/python -m bench.tracing [--requests 3000] [--repeat 3] [--payload 64]
"""

import os
import tempfile
from pathlib import Path

import uvloop

from bench.warm_invoke import e2e_round, median_round, paired_ratio, prepare, ratio_cell, round_arguments
from deploy import launcher
from fabric import telemetry

MODES = (("sequential", 1), ("in_flight_64", 64))


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


def spans_written(info: launcher.ClusterInfo) -> int:
    return sum(
        path.read_bytes().count(b'"spanId"') for path in Path(info.state_dir, "traces").glob("*.jsonl")
    )


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
        finally:
            for info in clusters:
                launcher.stop(info)
    ratios = {mode: paired_ratio(rounds[f"off_{mode}"], rounds[f"on_{mode}"]) for mode, _ in MODES}
    cells = {cell: median_round(values) for cell, values in rounds.items()}
    return {"cells": cells, "ratios": ratios, "spans": spans}


def report(results: dict) -> str:
    cells = results["cells"]
    lines = [
        f"spans written by the traced cluster: {results['spans']}",
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
