"""The cold-start ablation end to end: C concurrent `hetfaas invoke`s (released together) of a
trivial exec function and a trivial python function, against a one-node cluster per sandbox mode
(plain, the unsandboxed floor; naive; pool; prewarm). Every python invocation of a round is a cold
start (a fresh function per round); every exec invocation starts a process.

    .venv/bin/python -m bench.coldstart_e2e [--concurrency 32] [--rounds 4]
"""

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import uvloop

from bench.coldstart import burst
from cli.client import Client, InvokeOutcome
from deploy import launcher
from host_node.sandbox.pool import PoolSettings
from host_node.sandbox.settings import SandboxSettings

MODES = ("plain", "naive", "pool", "prewarm")
ECHO = "def handle(payload):\n    return payload\n"
PHASES = ("slot_acquire_ms", "sandbox_setup_ms", "exec_ms", "runtime_init_ms", "acquire_ms", "handler_ms")


def function_dir(root: Path, name: str, manifest: str, files: dict[str, str]) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "function.toml").write_text(f'name = "{name}"\ntenant = "bench"\n{manifest}')
    for filename, text in files.items():
        (directory / filename).write_text(text)
    return directory


async def pools_settled(client: Client, starts: int, target: int, mode: str) -> None:
    """Every sandbox so far has ended and given its slot back, and the pools are full again."""
    if mode == "plain":
        return
    key = "prewarmed" if mode == "prewarm" else "free"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        shards = [s for node in (await client.status()).nodes for s in node.pool]
        ended = shards and sum(s.ended for s in shards) >= starts and not any(s.recycling for s in shards)
        if ended and (mode == "naive" or all(getattr(s, key) >= target for s in shards)):
            return
        await asyncio.sleep(0.1)  # polling the cluster's status, as an operator would
    raise TimeoutError("the pools did not refill")


async def measure_mode(mode: str, concurrency: int, rounds: int, work: Path) -> dict:
    target = concurrency // (os.cpu_count() or 1) + 8
    pool = PoolSettings(low_water=target, target=target, idle_ms=20, max_per_s=2000)
    overrides = {
        "sandbox": SandboxSettings(mode=mode, cgroup_parent=f"hetfaas-bench-e2e-{mode}", pool=pool),
        "max_instances_per_function": concurrency * 2,
        "keep_alive_s": 1.0,  # cold instances of a round go away, and give their slots back
        "tracing": False,
    }
    info = launcher.up(work / mode, hosts=1, host_overrides=overrides, scheduler_overrides={"tracing": False})
    client = await Client.connect(info.nats_url, "bench-e2e", creds=info.nats_creds)
    results: dict[str, list[InvokeOutcome]] = {"exec": [], "python": []}
    try:
        await client.wait_until_ready(1, timeout_s=60)
        exec_fn = function_dir(work / mode, "true", 'runtime = "exec"\ncommand = ["/bin/true"]\n', {})
        await client.deploy(exec_fn)
        starts = 0
        for index in range(rounds + 1):  # round 0 warms up page caches and the code cache
            await pools_settled(client, starts, target, mode)
            outcomes = await invoke_burst(client, "true", concurrency)
            starts += concurrency
            if index:
                results["exec"] += outcomes
            name = f"py{index}"
            manifest = f'runtime = "python"\nhandler = "main:handle"\nconcurrency = {concurrency}\n'
            await client.deploy(
                function_dir(work / mode, name, manifest, {"main.py": "def handle(p):\n    return p\n"})
            )
            await pools_settled(client, starts, target, mode)
            outcomes = await invoke_burst(client, name, concurrency)
            starts += concurrency
            if index:
                results["python"] += outcomes
    finally:
        await client.close()
        launcher.stop(info)
    return {runtime: summarize(outcomes) for runtime, outcomes in results.items()}


async def invoke_burst(client: Client, name: str, concurrency: int) -> list[InvokeOutcome]:
    outcomes: list[InvokeOutcome] = []

    async def one() -> None:
        outcome = await client.invoke("bench", name, b"x", timeout_ms=60_000)
        if not outcome.ok:
            raise RuntimeError(f"{name}: {outcome.error}")
        outcomes.append(outcome)

    await burst(one, concurrency)
    return outcomes


def summarize(outcomes: list[InvokeOutcome]) -> dict:
    latencies = sorted(o.latency_ms for o in outcomes)
    cold = [o.reply for o in outcomes if o.reply and o.reply.cold_start]
    phases = {
        phase: statistics.median(r.phases_ms[phase] for r in cold if phase in r.phases_ms)
        for phase in PHASES
        if any(phase in r.phases_ms for r in cold)
    }
    return {
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)],
        "samples": len(latencies),
        "cold_starts": len(cold),
        "cold_phase_medians_ms": phases,
    }


def report(results: dict, concurrency: int) -> str:
    lines = [
        "| mode | exec p50 / p99 ms | python p50 / p99 ms | python cold starts "
        "| python cold-start phases (median ms) |",
        "|---|---|---|---|---|",
    ]
    for mode, cells in results.items():
        phases = ", ".join(
            f"{k.removesuffix('_ms')} {v:.1f}" for k, v in cells["python"]["cold_phase_medians_ms"].items()
        )
        lines.append(
            f"| {mode} | {cells['exec']['p50_ms']:.1f} / {cells['exec']['p99_ms']:.1f} "
            f"| {cells['python']['p50_ms']:.1f} / {cells['python']['p99_ms']:.1f} "
            f"| {cells['python']['cold_starts']}/{cells['python']['samples']} | {phases} |"
        )
    return f"C={concurrency} concurrent invocations, through the CLI's client, one host node\n\n" + "\n".join(
        lines
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("sandboxes need root")
    results = {}
    with tempfile.TemporaryDirectory(prefix="hetfaas-e2e-") as tmp:
        for mode in args.modes.split(","):
            print(f"mode {mode}", flush=True)
            results[mode] = uvloop.run(measure_mode(mode, args.concurrency, args.rounds, Path(tmp)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coldstart_e2e.json").write_text(json.dumps(results))
    print(report(results, args.concurrency))


if __name__ == "__main__":
    main()
