"""Warm invocation throughput and latency end to end, against raw nats-py request-reply.

Both are measured in the same run, on the same machine, with the same payload size:
  raw: client -> nats-server -> a bare echo responder process -> client
  e2e: client -> scheduler -> host node -> warm python instance -> node -> scheduler -> client
Each in two modes: sequential (one request at a time) and 64 requests in flight.

    .venv/bin/python -m bench.warm_invoke [--requests 3000] [--repeat 3] [--payload 64] [--tracing on|off]
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import uvloop

from cli.client import Client
from deploy import launcher

ECHO = "def handle(payload):\n    return payload\n"
SUBJECT = "bench.raw.echo"


async def measure(call: Callable[[], Awaitable[None]], requests: int, in_flight: int) -> dict:
    """Run `requests` calls with at most `in_flight` outstanding; latency of each, total rate."""
    latencies: list[float] = []
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": requests,
        "in_flight": in_flight,
        "req_per_s": round(requests / elapsed),
        "p50_us": round(statistics.median(latencies) * 1e6),
        "p99_us": round(latencies[int(len(latencies) * 0.99) - 1] * 1e6),
    }


def raw_creds(info: launcher.ClusterInfo) -> str | None:
    """The raw baseline's identity on a secured cluster (None without authentication)."""
    return launcher.unrestricted_creds(info, "bench-raw")


def start_raw_responder(info: launcher.ClusterInfo) -> subprocess.Popen:
    argv = [sys.executable, "-m", "bench.raw_responder", info.nats_url, SUBJECT, raw_creds(info) or ""]
    return subprocess.Popen(argv, stdout=subprocess.PIPE)


async def raw_round(info: launcher.ClusterInfo, payload: bytes, requests: int, in_flight: int) -> dict:
    nc = await nats.connect(info.nats_url, user_credentials=raw_creds(info))
    try:

        async def call() -> None:
            await nc.request(SUBJECT, payload, timeout=5)

        await measure(call, 300, in_flight)  # warm-up
        return await measure(call, requests, in_flight)
    finally:
        await nc.close()


def tenant_creds(info: launcher.ClusterInfo) -> str:
    """The tenant "bench"'s credentials on a secured cluster, made once as an operator makes
    them (its client then runs in the tenant's own account, as every tenant's does); "" on a
    cluster without authentication."""
    if not info.nats_creds:
        return ""
    out = Path(info.state_dir) / "bench-tenant.creds"
    if not out.exists():
        env = {**os.environ, "HETFAAS_STATE_DIR": info.state_dir}
        argv = [sys.executable, "-m", "cli", "tenant", "create", "bench", "--out", str(out)]
        subprocess.run(argv, env=env, check=True, capture_output=True)
    return str(out)


async def e2e_round(info: launcher.ClusterInfo, payload: bytes, requests: int, in_flight: int) -> dict:
    client = await Client.connect(info.nats_url, "bench", creds=tenant_creds(info))
    try:

        async def call() -> None:
            outcome = await client.invoke("bench", "echo", payload, timeout_ms=10_000)
            if outcome.reply is None or outcome.reply.output != payload:
                raise RuntimeError(f"bad invocation: {outcome.error}")

        await measure(call, 300, in_flight)  # warm-up: instances started, code cached
        return await measure(call, requests, in_flight)
    finally:
        await client.close()


async def prepare(info: launcher.ClusterInfo, work: Path, concurrency: int, hosts: int) -> None:
    operator = await Client.connect(info.nats_url, "bench-setup", creds=info.nats_creds)
    try:
        await operator.wait_until_ready(hosts, timeout_s=30)
    finally:
        await operator.close()
    client = await Client.connect(info.nats_url, "bench-setup", creds=tenant_creds(info))
    try:
        fn = work / "echo"
        fn.mkdir()
        (fn / "function.toml").write_text(
            f'name = "echo"\ntenant = "bench"\nruntime = "python"\nhandler = "main:handle"\n'
            f"concurrency = {concurrency}\n"
        )
        (fn / "main.py").write_text(ECHO)
        await client.deploy(fn)
    finally:
        await client.close()


def run(args: argparse.Namespace) -> dict:
    payload = os.urandom(args.payload)
    with tempfile.TemporaryDirectory(prefix="hetfaas-bench-") as tmp:
        work = Path(tmp)
        info = launcher.up(
            work / "state",
            hosts=args.hosts,
            schedulers=args.schedulers,
            scheduler_overrides={"tracing": args.tracing == "on"},
            host_overrides={"tracing": args.tracing == "on"},
            secure=args.security == "on",
        )
        responder = start_raw_responder(info)
        try:
            assert responder.stdout is not None and responder.stdout.readline().strip() == b"ready"
            uvloop.run(prepare(info, work, args.concurrency, args.hosts))
            results = {}
            for mode, in_flight in (("sequential", 1), ("in_flight_64", 64)):
                # Alternate raw and e2e rounds so drift on a shared machine hits both alike.
                rounds: dict[str, list[dict]] = {"raw": [], "e2e": []}
                for _ in range(args.repeat):
                    rounds["raw"].append(uvloop.run(raw_round(info, payload, args.requests, in_flight)))
                    rounds["e2e"].append(uvloop.run(e2e_round(info, payload, args.requests, in_flight)))
                for kind, cells in rounds.items():
                    results[f"{kind}_{mode}"] = median_round(cells)
                results[f"ratio_{mode}"] = paired_ratio(rounds["raw"], rounds["e2e"])
        finally:
            responder.terminate()
            responder.wait()
            launcher.stop(info)
    return results


def paired_ratio(base: list[dict], other: list[dict]) -> dict:
    """Throughput of `other` over `base` round by round (each pair ran back to back), then the
    median and range of those ratios: slow drift on a shared machine cancels within a pair, where
    a ratio of the two medians can pair a fast round of one with a slow round of the other."""
    ratios = sorted(o["req_per_s"] / b["req_per_s"] for b, o in zip(base, other, strict=True))
    return {"median": statistics.median(ratios), "low": ratios[0], "high": ratios[-1]}


def ratio_cell(ratio: dict) -> str:
    return f"{ratio['median']:.0%} ({ratio['low']:.0%}-{ratio['high']:.0%})"


def median_round(cells: list[dict]) -> dict:
    """The round with the median throughput (its latencies come with it, from the same round)."""
    return sorted(cells, key=lambda c: c["req_per_s"])[len(cells) // 2] | {"rounds": len(cells)}


def report(results: dict, args: argparse.Namespace) -> str:
    lines = [
        f"payload {args.payload} B, median of {args.repeat} rounds of {args.requests} requests, "
        f"{args.hosts} hosts, "
        f"{args.schedulers} scheduler(s), tracing {args.tracing}, "
        f"security {getattr(args, 'security', 'on')}, function concurrency {args.concurrency}",
        "",
        "e2e/raw: the median of the rounds' ratios (each e2e round against the raw round just "
        "before it), with their range",
        "",
        "| mode | raw req/s | e2e req/s | e2e/raw | raw p50 / p99 µs | e2e p50 / p99 µs | p50 ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in ("sequential", "in_flight_64"):
        raw, e2e = results[f"raw_{mode}"], results[f"e2e_{mode}"]
        lines.append(
            f"| {mode} | {raw['req_per_s']} | {e2e['req_per_s']} | {ratio_cell(results[f'ratio_{mode}'])} "
            f"| {raw['p50_us']} / {raw['p99_us']} | {e2e['p50_us']} / {e2e['p99_us']} "
            f"| {e2e['p50_us'] / raw['p50_us']:.2f}x |"
        )
    return "\n".join(lines)


def round_arguments(doc: str | None) -> argparse.ArgumentParser:
    """The arguments every warm-invocation benchmark takes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--payload", type=int, default=64, help="bytes per request")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per cell; the median is reported")
    parser.add_argument(
        "--concurrency", type=int, default=8, help="the function's concurrency (instances/node)"
    )
    return parser


def main() -> None:
    parser = round_arguments(__doc__)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--schedulers", type=int, default=1)
    parser.add_argument("--tracing", choices=("on", "off"), default="on")
    parser.add_argument(
        "--security",
        choices=("on", "off"),
        default="on",
        help="off: NATS without authentication (the baseline)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    results = run(args)
    print(report(results, args))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}))


if __name__ == "__main__":
    main()
