"""The cold-start ablation: C concurrent starts (all released at the same instant) of a trivial exec
function and a trivial python function, through the host node's start path, in modes naive, pool
and prewarm; in the same run runc and crun of an equivalent busybox-static container, and the floor
(bare fork+exec of the same binary, no sandbox). p50, p99 and starts/s per cell; a markdown table
and a PNG plot of p99 against C.

A start is measured from its release until the function is running its code: for exec, until the
command has exited (it is `true`); for python, until the instance reports its handler imported.

    .venv/bin/python -m bench.coldstart [--levels 1,8,32,128] [--samples 128] [--repeat 3]
"""

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

from bench import containers
from host_node.runtimes.exec import run_exec
from host_node.runtimes.python import PythonInstance
from host_node.sandbox import cgroups
from host_node.sandbox.agent import ShardedSpawner, real_python
from host_node.sandbox.pool import PoolSettings
from host_node.sandbox.settings import SandboxSettings
from host_node.spawner import RUNTIME_DIR

LIMITS = SandboxSettings().limits_for(128)  # the default size class, as a deployed function gets
HANDLER = "def handle(payload):\n    return payload\n"
CGROUP_PARENT = "hetfaas-bench-coldstart"
TRUE = "/bin/true"

Start = Callable[[], Awaitable[None]]


async def burst(start: Start, concurrency: int) -> tuple[list[float], float]:
    """Release `concurrency` starts at once; each one's latency, and the burst's wall time."""
    gate = asyncio.Event()
    latencies: list[float] = []

    async def one() -> None:
        await gate.wait()
        released = time.perf_counter()
        await start()
        latencies.append(time.perf_counter() - released)

    tasks = [asyncio.create_task(one()) for _ in range(concurrency)]
    await asyncio.sleep(0)  # every task is parked on the gate
    began = time.perf_counter()
    gate.set()
    await asyncio.gather(*tasks)
    return latencies, time.perf_counter() - began


async def measure(
    start: Start, concurrency: int, samples: int, between: Callable[[], Awaitable[None]]
) -> dict:
    latencies: list[float] = []
    busy = 0.0
    await burst(start, min(concurrency, 4))  # warm-up: page cache, first-use costs
    await between()
    while len(latencies) < samples:
        got, wall = await burst(start, concurrency)
        latencies += got
        busy += wall
        await between()  # a pool refills after a burst, as in production
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1e3,
        "starts_per_s": len(latencies) / busy,
        "samples": len(latencies),
    }


# -- the ways to start --------------------------------------------------------------------


def floor_exec() -> Start:
    async def start() -> None:
        pid = os.posix_spawn(TRUE, [TRUE], {})  # noqa: ASYNC221 - vfork+exec: returns at once
        await _exited(pid)

    return start


def floor_python(code: Path) -> Start:
    """The same worker, plainly spawned; measured, like the sandboxed start, until it reports
    its handler imported (its exit, after the socket closes, is reaped off the clock)."""
    worker = str(RUNTIME_DIR / "python_worker.py")
    reaping: set[asyncio.Task] = set()

    async def start() -> None:
        parent, child = socket.socketpair()
        argv = [real_python(), "-I", "-S", worker, "3", "handler:handle", str(code), "1000000"]
        actions = [(os.POSIX_SPAWN_DUP2, child.fileno(), 3)]
        pid = os.posix_spawn(argv[0], argv, {}, file_actions=actions)  # noqa: ASYNC221 - as above
        child.close()
        await asyncio.get_running_loop().sock_recv(parent, 64)  # READY
        parent.close()  # the worker exits when its socket closes
        task = asyncio.create_task(_exited(pid))
        reaping.add(task)
        task.add_done_callback(reaping.discard)

    return start


async def _exited(pid: int) -> None:
    loop = asyncio.get_running_loop()
    fd = os.pidfd_open(pid)
    done = loop.create_future()
    loop.add_reader(fd, done.set_result, None)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    os.waitpid(pid, 0)  # noqa: ASYNC222 - it has exited (its pidfd said so): this only reaps


def sandbox_exec(spawner: ShardedSpawner, code: Path) -> Start:
    async def start() -> None:
        await run_exec(spawner, [TRUE], code, b"", 30.0, 1 << 20, LIMITS, {})

    return start


def sandbox_python(spawner: ShardedSpawner, code: Path) -> Start:
    null = os.open(os.devnull, os.O_WRONLY)

    async def start() -> None:
        instance = await PythonInstance.start(
            spawner, "handler:handle", code, null, 1 << 20, 30.0, LIMITS, {}
        )
        instance.kill()

    return start


def container(runtime: str, bundles: list[Path]) -> Start:
    free = list(bundles)

    async def start() -> None:
        bundle = free.pop()
        try:
            proc = await asyncio.create_subprocess_exec(*containers.command(runtime, bundle))
            if await proc.wait() != 0:
                raise RuntimeError(f"{runtime} run failed")
        finally:
            free.append(bundle)

    return start


# -- the run ------------------------------------------------------------------------------


async def run_sandboxes(mode: str, levels: list[int], samples: int, work: Path, code: Path) -> dict:
    biggest = max(levels)
    shards = os.cpu_count() or 1
    pool = PoolSettings(
        low_water=biggest // shards + 8, target=biggest // shards + 8, idle_ms=20, max_per_s=2000
    )
    settings = SandboxSettings(mode=mode, cgroup_parent=CGROUP_PARENT, pool=pool)
    spawner = ShardedSpawner(settings, f"bench-{mode}", work)
    await spawner.open()
    key = "prewarmed" if mode == "prewarm" else "free"

    async def refilled() -> None:
        """Every sandbox started so far has ended and its slot is back (or, naive, removed), and
        every shard is full again: each burst starts from the same state, in every mode."""
        started = spawner.launches

        def ready(states: list) -> bool:
            if sum(s.ended for s in states) < started or any(s.recycling for s in states):
                return False
            return mode == "naive" or all(getattr(s, key) >= pool.target for s in states)

        await spawner.wait_for_states(ready, 120)

    results = {}
    try:
        for runtime, make in (("exec", sandbox_exec), ("python", sandbox_python)):
            for level in levels:
                results[f"{runtime}/{mode}/{level}"] = await measure(
                    make(spawner, code), level, samples, refilled
                )
                print(
                    f"  {runtime} {mode} C={level}: {_cell(results[f'{runtime}/{mode}/{level}'])}", flush=True
                )
    finally:
        await spawner.close()
        spawner.remove_all_slots()
    return results


async def run_baselines(levels: list[int], samples: int, work: Path, code: Path) -> dict:
    async def nothing() -> None:
        pass

    rootfs = containers.make_rootfs(work)
    bundles = [
        containers.make_bundle(work, rootfs, i, LIMITS.memory_mb, LIMITS.cpu_millis, LIMITS.pids_max)
        for i in range(max(levels))
    ]
    starters: dict[str, Start] = {
        "exec/floor": floor_exec(),
        "python/floor": floor_python(code),
        "exec/runc": container("runc", bundles),
        "exec/crun": container("crun", bundles),
    }
    results = {}
    try:
        for name, start in starters.items():
            for level in levels:
                results[f"{name}/{level}"] = await measure(start, level, samples, nothing)
                print(f"  {name} C={level}: {_cell(results[f'{name}/{level}'])}", flush=True)
    finally:
        containers.cleanup()
    return results


def _cell(cell: dict) -> str:
    return f"{cell['p50_ms']:.1f} / {cell['p99_ms']:.1f} · {cell['starts_per_s']:.0f}/s"


def median_cells(runs: list[dict]) -> dict:
    """Per cell, the run with the median p99 (its other numbers come with it)."""
    merged = {}
    for key in runs[0]:
        cells = sorted((run[key] for run in runs), key=lambda c: c["p99_ms"])
        merged[key] = cells[len(cells) // 2]
    return merged


def report(results: dict, levels: list[int]) -> str:
    rows = []
    methods = [
        ("exec", "floor"), ("exec", "naive"), ("exec", "pool"), ("exec", "prewarm"),
        ("exec", "crun"), ("exec", "runc"),
        ("python", "floor"), ("python", "naive"), ("python", "pool"), ("python", "prewarm"),
    ]  # fmt: skip
    for runtime, method in methods:
        cells = [results.get(f"{runtime}/{method}/{level}") for level in levels]
        rows.append(f"| {runtime} | {method} | " + " | ".join(_cell(c) if c else "-" for c in cells) + " |")
    header = "| runtime | method | " + " | ".join(f"C={level}" for level in levels) + " |"
    lines = [header, "|---|---|" + "---|" * len(levels), *rows, ""]
    at = 32 if 32 in levels else levels[-1]
    prewarm, floor = results[f"exec/prewarm/{at}"]["p99_ms"], results[f"exec/floor/{at}"]["p99_ms"]
    runc, crun = results[f"exec/runc/{at}"]["p99_ms"], results[f"exec/crun/{at}"]["p99_ms"]
    lines.append(
        f"At C={at}, exec p99: prewarm {prewarm:.1f} ms; runc/prewarm {runc / prewarm:.1f}x (target ≥ 5x), "
        f"crun/prewarm {crun / prewarm:.1f}x (target ≥ 2x), "
        f"prewarm/floor {prewarm / floor:.1f}x (target ≤ 3x)."
    )
    return "\n".join(lines)


def ensure_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        print("installing the bench extra (matplotlib) into the virtualenv", flush=True)
        root = Path(__file__).resolve().parents[1]
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "-e", f"{root}[test,bench]"], check=True
        )


def plot(results: dict, levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"floor": "black", "naive": "tab:red", "pool": "tab:orange", "prewarm": "tab:green"}
    colors |= {"crun": "tab:blue", "runc": "tab:purple"}
    figure, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for axis, runtime in zip(axes, ("exec", "python"), strict=True):
        for method, color in colors.items():
            if f"{runtime}/{method}/{levels[0]}" in results:
                p99 = [results[f"{runtime}/{method}/{c}"]["p99_ms"] for c in levels]
                axis.plot(levels, p99, marker="o", color=color, label=method)
        axis.set(xscale="log", yscale="log", xlabel="concurrent cold starts (C)", title=f"{runtime} function")
        axis.set_xticks(levels, [str(c) for c in levels])
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    axes[0].set_ylabel("p99 start latency (ms)")
    figure.suptitle("hetfaas cold starts: p99 against concurrency")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


async def one_run(levels: list[int], samples: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="hetfaas-coldstart-") as tmp:
        work = Path(tmp)
        code = work / "code"
        code.mkdir()
        (code / "handler.py").write_text(HANDLER)
        for path in (work, code, code / "handler.py"):
            path.chmod(0o755)
        results = await run_baselines(levels, samples, work, code)
        for mode in ("naive", "pool", "prewarm"):
            results |= await run_sandboxes(mode, levels, samples, work, code)
    return results


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
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        levels = [int(level) for level in saved["args"]["levels"].split(",")]
        results = median_cells(saved["runs"])
        plot(results, levels, args.out / "coldstart_p99.png")
        print(report(results, levels))
        return
    if os.geteuid() != 0:
        raise SystemExit("the cold-start benchmark needs root (cgroups, namespaces, runc/crun)")
    levels = [int(level) for level in args.levels.split(",")]
    containers.ensure_installed()
    ensure_matplotlib()
    cgroups.remove_tree(CGROUP_PARENT)
    runs = []
    for index in range(args.repeat):
        print(f"run {index + 1}/{args.repeat}", flush=True)
        runs.append(uvloop.run(one_run(levels, args.samples)))
    results = median_cells(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coldstart.json").write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "runs": runs})
    )
    plot(results, levels, args.out / "coldstart_p99.png")
    print(report(results, levels))


if __name__ == "__main__":
    main()
