"""Python functions end to end, through the client `hetfaas invoke` uses, against a one-node
cluster: a trivial function, one importing numpy and one rendering a jinja2 template (their
layers deployed as `hetfaas deploy` does). Per function, in one cluster with today's starts
(no stem cells, no templates) and one with the defaults (16 stem cells, templates):

- first: its first cold start on the node (defaults: a stem cell);
- cold: C invocations released together once the node's instances of it have stopped (defaults:
  forks of its template);
- warm: C invocations together while C instances are idle.

p50 / p99 client latency per cell over --rounds rounds; a plot, bench/out/python_e2e.png.

    sudo .venv/bin/python -m bench.python_e2e [--concurrency 8] [--rounds 4]
"""

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import uvloop

from bench.coldstart import ensure_matplotlib
from bench.coldstart_e2e import function_dir
from bench.python_imports import FUNCTIONS as HEAVY
from cli.client import Client
from deploy import launcher

FUNCTIONS = {"trivial": ([], "def handle(payload):\n    return payload\n"), **HEAVY}
CONFIGS = {
    "today": {"python_stem_cells": 0, "python_templates": False},
    "defaults": {},
}
KEEP_ALIVE_S = 1.0  # instances stop soon after a round, so the next round's starts are cold


async def no_instances(client: Client) -> None:
    """Until the node has stopped every instance (its keep-alive passed)."""
    async with asyncio.timeout(60):
        while True:
            if (await client.status()).nodes[0].instances == 0:
                return
            await asyncio.sleep(0.1)  # polling the cluster's status, as an operator would


async def templates_at_least(client: Client, count: int, wanted: bool) -> None:
    if not wanted:
        return
    async with asyncio.timeout(60):
        while True:
            if (await client.status()).nodes[0].templates >= count:
                return
            await asyncio.sleep(0.1)


async def together(client: Client, name: str, calls: int) -> list[tuple[float, str]]:
    outcomes = await asyncio.gather(
        *(client.invoke("bench", name, b"ada", timeout_ms=60_000) for _ in range(calls))
    )
    bad = [o.error for o in outcomes if not o.ok]
    assert not bad, bad
    return [(o.latency_ms, o.reply.start_path) for o in outcomes]


async def measure_config(config: str, concurrency: int, rounds: int, work: Path) -> dict:
    overrides = {"keep_alive_s": KEEP_ALIVE_S, "max_instances_per_function": concurrency * 2} | CONFIGS[
        config
    ]
    # the node's keep-alive, not the scheduler's histogram (60 s bins: it would keep them a minute)
    no_policy = {"keep_alive": {"enabled": False}}
    info = launcher.up(work / config, hosts=1, host_overrides=overrides, scheduler_overrides=no_policy)
    cells: dict = {}
    try:
        client = await Client.connect(info.nats_url, "bench", creds=info.nats_creds)
        try:
            await client.wait_until_ready(1, timeout_s=60)
            for index, (name, (requirements, handler)) in enumerate(FUNCTIONS.items()):
                manifest = (
                    f'runtime = "python"\nhandler = "handler:handle"\nconcurrency = {concurrency * 2}\n'
                )
                manifest += "memory_mb = 256\ntimeout_ms = 60000\n"
                if requirements:
                    manifest += f"[python]\nrequirements = {json.dumps(requirements)}\n"
                await client.deploy(function_dir(work / config, name, manifest, {"handler.py": handler}))
                first = await together(client, name, 1)
                await templates_at_least(client, index + 1, config == "defaults")
                cold, warm = [], []
                for _ in range(rounds):
                    await no_instances(client)
                    cold += await together(client, name, concurrency)
                    warm += await together(client, name, concurrency)
                cells[name] = {"first": first, "cold": cold, "warm": warm}
                print(f"  {config} {name}: {summary(cells[name])}", flush=True)
        finally:
            await client.close()
    finally:
        launcher.stop(info)
    return cells


def summary(cells: dict) -> str:
    return "; ".join(f"{kind} {_cell(values)}" for kind, values in cells.items())


def _cell(values: list[tuple[float, str]]) -> str:
    """p50 / p99 of the cell, then p50 and count per start path (a call of a cold round may have
    waited for an instance another started, and run warm)."""
    latencies = sorted(latency for latency, _ in values)
    p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)]
    by_path: dict[str, list[float]] = {}
    for latency, path in values:
        by_path.setdefault(path or "warm", []).append(latency)
    paths = ", ".join(f"{p} {statistics.median(v):.1f} ms, {len(v)}x" for p, v in sorted(by_path.items()))
    return f"{statistics.median(latencies):.1f} / {p99:.1f} ms ({paths})"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(FUNCTIONS), figsize=(4 * len(FUNCTIONS), 4.5), sharey=True)
    kinds = ("first start", "later cold starts", "warm")
    for axis, name in zip(axes, FUNCTIONS, strict=True):
        for offset, config in enumerate(CONFIGS):
            cells = results[config][name]
            cold = [v for v, path in cells["cold"] if path] or [
                v for v, _ in cells["cold"]
            ]  # the cold starts
            medians = [statistics.median(v for v, _ in cells["first"]), statistics.median(cold)]
            medians.append(statistics.median(v for v, _ in cells["warm"]))
            positions = [k + offset * 0.4 for k in range(len(kinds))]
            axis.bar(positions, medians, width=0.4, label=config)
        axis.set(title=name, yscale="log", xticks=[k + 0.2 for k in range(len(kinds))], xticklabels=kinds)
        axis.grid(True, axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("p50 latency through the client (ms)")
    axes[0].legend()
    figure.suptitle("python functions end to end: today's starts against stem cells and templates")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--from-json", type=Path, help="only redraw the plot and table of a saved run")
    args = parser.parse_args()
    ensure_matplotlib()
    if args.from_json:
        report(json.loads(args.from_json.read_text()), args.out)
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="hetfaas-python-e2e-") as tmp:
        for config in CONFIGS:
            started = time.monotonic()
            results[config] = uvloop.run(measure_config(config, args.concurrency, args.rounds, Path(tmp)))
            print(f"{config}: {time.monotonic() - started:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "python_e2e.json").write_text(json.dumps(results))
    report(results, args.out)


def report(results: dict, out: Path) -> None:
    plot(results, out / "python_e2e.png")
    for config, functions in results.items():
        for name, cells in functions.items():
            print(f"| {config} | {name} | {summary(cells)} |")


if __name__ == "__main__":
    main()
