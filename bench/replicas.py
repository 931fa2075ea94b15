"""Warm invocation throughput end to end with 1 and 2 scheduler replicas, in one run, beside raw
nats-py request-reply (the same baseline as bench/warm_invoke.py).

One cluster (2 host nodes, 2 scheduler replicas, tracing off). Rounds alternate: raw, e2e with
both replicas, e2e with scheduler-1 stopped (SIGTERM; measured once the other has seen it go,
so it holds whole shares), then scheduler-1 started again. Each cell is the median round.

    .venv/bin/python -m bench.replicas [--requests 3000] [--repeat 3] [--payload 64]
"""

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

import uvloop

from bench.warm_invoke import (
    e2e_round,
    median_round,
    prepare,
    raw_round,
    round_arguments,
    start_raw_responder,
)
from cli.client import Client
from deploy import launcher

OFF = {"tracing": False}
MODES = (("sequential", 1), ("in_flight_64", 64))


async def wait_for_replicas(info: launcher.ClusterInfo, count: int) -> None:
    client = await Client.connect(info.nats_url, "bench-replicas", creds=info.nats_creds)
    try:
        async with asyncio.timeout(30):
            while True:
                status = await client.status()
                if len(status.replicas) == count and all(r.nodes_healthy for r in status.replicas):
                    return
                await asyncio.sleep(0.2)
    finally:
        await client.close()


def one_replica(info: launcher.ClusterInfo) -> None:
    launcher.terminate(info.processes["scheduler-1"], Path(info.state_dir), timeout_s=10)
    uvloop.run(wait_for_replicas(info, 1))


def two_replicas(info: launcher.ClusterInfo) -> None:
    launcher.start_scheduler(info, 1, OFF)
    uvloop.run(wait_for_replicas(info, 2))


def run(args: argparse.Namespace) -> dict:
    payload = os.urandom(args.payload)
    with tempfile.TemporaryDirectory(prefix="hetfaas-bench-") as tmp:
        work = Path(tmp)
        info = launcher.up(work / "state", hosts=2, schedulers=2, scheduler_overrides=OFF, host_overrides=OFF)
        responder = start_raw_responder(info)
        rounds: dict[str, list[dict]] = {f"{k}_{m}": [] for k in ("raw", "e2e_1", "e2e_2") for m, _ in MODES}
        try:
            assert responder.stdout is not None and responder.stdout.readline().strip() == b"ready"
            uvloop.run(prepare(info, work, args.concurrency, 2))
            uvloop.run(wait_for_replicas(info, 2))
            for _ in range(args.repeat):
                for mode, in_flight in MODES:
                    rounds[f"raw_{mode}"].append(
                        uvloop.run(raw_round(info, payload, args.requests, in_flight))
                    )
                    rounds[f"e2e_2_{mode}"].append(
                        uvloop.run(e2e_round(info, payload, args.requests, in_flight))
                    )
                one_replica(info)
                for mode, in_flight in MODES:
                    rounds[f"e2e_1_{mode}"].append(
                        uvloop.run(e2e_round(info, payload, args.requests, in_flight))
                    )
                two_replicas(info)
        finally:
            responder.terminate()
            responder.wait()
            launcher.stop(info)
    return {cell: median_round(values) for cell, values in rounds.items()}


def report(results: dict) -> str:
    lines = [
        "| mode | raw req/s | 1 replica req/s (of raw) | 2 replicas req/s (of raw) | 2 vs 1 "
        "| p50 / p99 µs: 1 replica | 2 replicas |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, _ in MODES:
        raw, one, two = (results[f"{k}_{mode}"] for k in ("raw", "e2e_1", "e2e_2"))
        lines.append(
            f"| {mode} | {raw['req_per_s']} | {one['req_per_s']} ({one['req_per_s'] / raw['req_per_s']:.0%}) "
            f"| {two['req_per_s']} ({two['req_per_s'] / raw['req_per_s']:.0%}) "
            f"| {two['req_per_s'] / one['req_per_s']:.2f}x | {one['p50_us']} / {one['p99_us']} "
            f"| {two['p50_us']} / {two['p99_us']} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = round_arguments(__doc__).parse_args()
    print(report(run(args)))


if __name__ == "__main__":
    main()
