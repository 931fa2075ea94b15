"""Python cold starts by start path: C concurrent starts of a trivial python function (released
at the same instant) through the host node's start path, from release until the instance says
its handler is imported. In one sandbox pool (prewarm mode), alternating per level:

- python/floor: the bare interpreter, plainly spawned (no sandbox): the floor of a fresh start
- python/prewarm: today's fresh start, a prewarmed sandbox, then the interpreter
- python/stem: a stem cell per start (the stock as large as the burst)
- python/stem16: the node's default stock of 16 stem cells; the rest of the burst starts fresh
- python/template: a fork of the function's template per start (its cgroup move included)
- exec/prewarm: a trivial exec function, the reference the python target is set against

Each burst starts from a full pool and a full stock (both refill between bursts, as a node's do
between bursts). p50, p99 and starts/s per cell; the median of --repeat runs.

    sudo .venv/bin/python -m bench.python_starts [--levels 1,8,32,128] [--samples 128] [--repeat 3]
"""

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path

import uvloop

from bench.coldstart import (
    LIMITS,
    Start,
    _cell,
    ensure_matplotlib,
    floor_python,
    measure,
    median_cells,
    sandbox_exec,
    sandbox_python,
)
from host_node.runtimes.python import FunctionCode, PythonInstance
from host_node.runtimes.python_template import Template
from host_node.sandbox import cgroups
from host_node.sandbox.agent import ShardedSpawner
from host_node.sandbox.pool import PoolSettings
from host_node.sandbox.settings import SandboxSettings
from host_node.stem_cells import StemCells

CGROUP_PARENT = "hetfaas-bench-python-starts"
HANDLER = "def handle(payload):\n    return payload\n"
DEFAULT_STOCK = 16  # HostNodeSettings.python_stem_cells
METHODS = (
    "python/floor",
    "python/prewarm",
    "python/stem",
    "python/stem16",
    "python/template",
    "exec/prewarm",
)


def template_python(spawner: ShardedSpawner, template: Template) -> Start:
    """A fork of the function's template, as a node's later cold starts are."""

    async def start() -> None:
        instance = await template.fork(spawner, 30.0, {})
        instance.kill()

    return start


def stem_python(spawner: ShardedSpawner, code: Path, stems: StemCells) -> Start:
    """As a node starts an instance: a stem cell if one is stocked, else a fresh start."""
    null = os.open(os.devnull, os.O_WRONLY)

    async def start() -> None:
        stem = stems.take()
        if stem is None:
            instance = await PythonInstance.start(
                spawner, "handler:handle", code, null, 1 << 20, 30.0, LIMITS, {}
            )
        else:
            instance = await stem.become(
                spawner, "handler:handle", code, None, null, 1 << 20, 30.0, LIMITS, {}
            )
        instance.kill()

    return start


async def one_run(levels: list[int], samples: int, work: Path, code: Path) -> dict:
    biggest = max(levels)
    shards = os.cpu_count() or 1
    # room in the pool for a full stock and a whole burst beside it
    per_shard = 2 * biggest // shards + 8
    pool = PoolSettings(low_water=per_shard, target=per_shard, idle_ms=20, max_per_s=2000)
    settings = SandboxSettings(mode="prewarm", cgroup_parent=CGROUP_PARENT, pool=pool)
    spawner = ShardedSpawner(settings, "bench-python-starts", work)
    await spawner.open()
    stems = StemCells(spawner, settings.limits_for(settings.idle_memory_mb), 0)
    stocking = asyncio.create_task(stems.keep_stocked())
    null = os.open(os.devnull, os.O_WRONLY)
    template = await Template.start(
        spawner, "handler:handle", FunctionCode(code), null, 1 << 20, 30.0, LIMITS
    )

    async def refilled() -> None:
        """Every sandbox started so far has ended, the pool is full again, and so is the stock."""
        started = spawner.launches

        def ready(states: list) -> bool:
            # the stock and the template are launched and alive; every other launch has ended
            if sum(s.ended for s in states) < started - stems.ready - 1 or any(s.recycling for s in states):
                return False
            return all(s.prewarmed >= pool.target for s in states)

        await stems.stocked()
        await spawner.wait_for_states(ready, 120)

    results = {}
    try:
        for level in levels:
            for method in METHODS:
                stock = {"python/stem": level, "python/stem16": DEFAULT_STOCK}.get(method, 0)
                stems.restock(stock)
                if method == "python/floor":
                    start = floor_python(code)
                elif method == "python/prewarm":
                    start = sandbox_python(spawner, code)
                elif method == "exec/prewarm":
                    start = sandbox_exec(spawner, code)
                elif method == "python/template":
                    start = template_python(spawner, template)
                else:
                    start = stem_python(spawner, code, stems)
                cell = results[f"{method}/{level}"] = await measure(start, level, samples, refilled)
                print(f"  {method} C={level}: {_cell(cell)}", flush=True)
    finally:
        stocking.cancel()
        stems.close()
        template.kill()
        await spawner.close()
        spawner.remove_all_slots()
    return results


def report(results: dict, levels: list[int]) -> str:
    header = "| method | " + " | ".join(f"C={level}" for level in levels) + " |"
    lines = [header, "|---|" + "---|" * len(levels)]
    for method in METHODS:
        cells = [results.get(f"{method}/{level}") for level in levels]
        lines.append(f"| {method} | " + " | ".join(_cell(c) if c else "-" for c in cells) + " |")
    lines.append("")
    if 32 in levels:
        stem, exec_ = results["python/stem/32"]["p99_ms"], results["exec/prewarm/32"]["p99_ms"]
        lines.append(
            f"C=32 p99: python stem {stem:.1f} ms, exec prewarm {exec_:.1f} ms: "
            f"{stem / exec_:.2f}x (target ≤ 2x)."
        )
    if 32 in levels:
        fork = results["python/template/32"]["p99_ms"]
        exec_32 = results["exec/prewarm/32"]["p99_ms"]
        lines.append(f"C=32 p99: python template fork {fork:.1f} ms: {fork / exec_32:.2f}x exec prewarm's.")
    if 128 in levels:
        today = results["python/prewarm/128"]["starts_per_s"]
        rates = {m: results[f"python/{m}/128"]["starts_per_s"] for m in ("stem", "stem16", "template")}
        said = ", ".join(f"{m} {rate:.0f} ({rate / today:.1f}x)" for m, rate in rates.items())
        lines.append(f"C=128 starts/s: {said}; today's prewarm {today:.0f} (target ≥ 5x).")
    return "\n".join(lines)


def plot(results: dict, levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 5))
    for method in METHODS:
        axis.plot(levels, [results[f"{method}/{c}"]["p99_ms"] for c in levels], marker="o", label=method)
    axis.set(xscale="log", yscale="log", xlabel="concurrent cold starts (C)", ylabel="p99 start latency (ms)")
    axis.set_xticks(levels, [str(c) for c in levels])
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.suptitle("python cold starts by start path: p99 against concurrency")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", default="1,8,32,128", help="concurrency levels C")
    parser.add_argument("--samples", type=int, default=128, help="starts per cell and run")
    parser.add_argument("--repeat", type=int, default=3, help="runs; each cell reports the median run")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--from-json", type=Path, help="only redraw the table and plot of a saved run")
    args = parser.parse_args()
    ensure_matplotlib()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        levels = [int(level) for level in saved["args"]["levels"].split(",")]
        results = median_cells(saved["runs"])
        plot(results, levels, args.out / "python_starts_p99.png")
        print(report(results, levels))
        return
    if os.geteuid() != 0:
        raise SystemExit("the python start benchmark needs root (cgroups, namespaces)")
    levels = [int(level) for level in args.levels.split(",")]
    cgroups.remove_tree(CGROUP_PARENT)
    runs = []
    with tempfile.TemporaryDirectory(prefix="hetfaas-python-starts-") as tmp:
        work, code = Path(tmp), Path(tmp) / "code"
        code.mkdir()
        (code / "handler.py").write_text(HANDLER)
        for path in (work, code, code / "handler.py"):
            path.chmod(0o755)
        for index in range(args.repeat):
            print(f"run {index + 1}/{args.repeat}", flush=True)
            runs.append(uvloop.run(one_run(levels, args.samples, work, code)))
    results = median_cells(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, levels, args.out / "python_starts_p99.png")
    (args.out / "python_starts.json").write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "runs": runs})
    )
    print(report(results, levels))


if __name__ == "__main__":
    main()
