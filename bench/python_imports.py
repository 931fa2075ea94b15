"""Cold starts of import-heavy python functions on a node that already ran them once: one that
imports numpy, one that renders a jinja2 template, each with its dependencies in a layer built
as `hetfaas deploy` builds it (cli/layers.py, from PyPI). C concurrent starts released at once,
measured until the instance says its handler is imported, per start path:

- floor: a fresh interpreter importing the same packages, plainly spawned (no sandbox)
- prewarm: today's fresh start in a prewarmed sandbox, the layer mounted at /deps
- stem: a stem cell given the function (its interpreter up; the imports still to do)
- template: a fork of the function's template (the imports done once, by the template)

Target: the template's starts at least 5x faster than the floor's, at C=1 and C=32.

    sudo .venv/bin/python -m bench.python_imports [--levels 1,32] [--samples 64] [--repeat 3]
"""

import argparse
import asyncio
import json
import os
import socket
import tempfile
from pathlib import Path

import uvloop

from bench.coldstart import Start, _cell, _exited, measure, median_cells
from cli import layers
from fabric.bundles import unpack
from host_node.runtimes.python import FunctionCode, PythonInstance
from host_node.runtimes.python_template import Template
from host_node.sandbox import cgroups
from host_node.sandbox.agent import ShardedSpawner, real_python
from host_node.sandbox.pool import PoolSettings
from host_node.sandbox.settings import SandboxSettings
from host_node.spawner import RUNTIME_DIR
from host_node.stem_cells import StemCells

CGROUP_PARENT = "hetfaas-bench-python-imports"
FUNCTIONS = {
    "numpy": (
        ["numpy==2.2.6"],
        "import numpy as np\n\ndef handle(payload):\n    return str(np.arange(10).sum())\n",
    ),
    "jinja2": (
        ["jinja2==3.1.6"],
        "from jinja2 import Template\n\nPAGE = Template('<p>hello {{ name }}</p>')\n\n"
        "def handle(payload):\n    return PAGE.render(name=payload.decode())\n",
    ),
}
METHODS = ("floor", "prewarm", "stem", "template")
LIMITS_HEAVY = SandboxSettings().limits_for(256)  # numpy's import wants more than 128 MB's share


def floor(code: FunctionCode) -> Start:
    """The worker with the layer, plainly spawned, until READY (its exit is reaped off the clock)."""
    worker = str(RUNTIME_DIR / "python_worker.py")
    reaping: set[asyncio.Task] = set()

    async def start() -> None:
        parent, child = socket.socketpair()
        argv = [real_python(), "-I", "-S", worker, "3", "handler:handle", str(code.code_dir), "1000000"]
        argv += ["bytes", str(code.deps_dir)]
        actions = [(os.POSIX_SPAWN_DUP2, child.fileno(), 3)]
        pid = os.posix_spawn(argv[0], argv, {}, file_actions=actions)  # noqa: ASYNC221 - vfork+exec
        child.close()
        await asyncio.get_running_loop().sock_recv(parent, 64)  # READY
        parent.close()
        task = asyncio.create_task(_exited(pid))
        reaping.add(task)
        task.add_done_callback(reaping.discard)

    return start


def sandboxed(
    method: str, spawner: ShardedSpawner, code: FunctionCode, template: Template, stems: StemCells
) -> Start:
    null = os.open(os.devnull, os.O_WRONLY)

    async def start() -> None:
        if method == "prewarm":
            instance = await PythonInstance.start(
                spawner,
                "handler:handle",
                code.code_dir,
                null,
                1 << 20,
                60.0,
                LIMITS_HEAVY,
                {},
                "bytes",
                code.deps_dir,
            )
        elif method == "stem":
            stem = stems.take()  # stocked before the burst, as a node's are
            assert stem is not None, "the stock covers the burst"
            instance = await stem.become(
                spawner, "handler:handle", code.code_dir, code.deps_dir, null, 1 << 20, 60.0, LIMITS_HEAVY, {}
            )
        else:
            instance = await template.fork(spawner, 60.0, {})
        instance.kill()

    return start


def prepare(work: Path, name: str, requirements: list[str], handler: str) -> FunctionCode:
    layer = layers.build(requirements, lambda line: print("  " + line, flush=True))
    deps = work / f"{name}-deps"
    unpack(layer.data, deps)
    code = work / f"{name}-code"
    code.mkdir()
    (code / "handler.py").write_text(handler)
    for path in (deps, code, code / "handler.py"):
        path.chmod(0o755)
    for directory, _, files in os.walk(deps):
        os.chmod(directory, 0o755)
        for file in files:
            os.chmod(os.path.join(directory, file), 0o644)
    return FunctionCode(code, deps)


async def one_run(levels: list[int], samples: int, work: Path, codes: dict[str, FunctionCode]) -> dict:
    pool = PoolSettings(low_water=max(levels) + 8, target=max(levels) + 8, idle_ms=20, max_per_s=2000)
    spawner = ShardedSpawner(
        SandboxSettings(mode="prewarm", cgroup_parent=CGROUP_PARENT, pool=pool), "bench-imports", work
    )
    await spawner.open()
    null = os.open(os.devnull, os.O_WRONLY)
    idle = SandboxSettings().limits_for(SandboxSettings().idle_memory_mb)
    stems = StemCells(spawner, idle, 0)
    stocking = asyncio.create_task(stems.keep_stocked())
    results: dict = {}
    try:
        for name, code in codes.items():
            template = await Template.start(
                spawner, "handler:handle", code, null, 1 << 20, 60.0, LIMITS_HEAVY
            )
            try:
                for level in levels:
                    for method in METHODS:
                        stems.restock(level if method == "stem" else 0)
                        await _settled(spawner, stems)()  # the warm-up burst too starts from a full stock
                        start = (
                            floor(code)
                            if method == "floor"
                            else sandboxed(method, spawner, code, template, stems)
                        )
                        cell = results[f"{name}/{method}/{level}"] = await measure(
                            start, level, samples, _settled(spawner, stems)
                        )
                        print(f"  {name} {method} C={level}: {_cell(cell)}", flush=True)
            finally:
                template.kill()
    finally:
        stocking.cancel()
        stems.close()
        await spawner.close()
        spawner.remove_all_slots()
    return results


def _settled(spawner: ShardedSpawner, stems: StemCells):
    async def settled() -> None:
        """The stock is full, and every other sandbox but the template has ended, its slot back."""
        await stems.stocked()
        started = spawner.launches

        def ready(states: list) -> bool:
            ended = sum(s.ended for s in states) >= started - 1 - stems.ready
            return ended and not any(s.recycling for s in states)

        await spawner.wait_for_states(ready, 120)

    return settled


def report(results: dict, levels: list[int]) -> str:
    header = "| function | method | " + " | ".join(f"C={level}" for level in levels) + " |"
    lines = [header, "|---|---|" + "---|" * len(levels)]
    for name in FUNCTIONS:
        for method in METHODS:
            cells = [results.get(f"{name}/{method}/{level}") for level in levels]
            lines.append(f"| {name} | {method} | " + " | ".join(_cell(c) if c else "-" for c in cells) + " |")
    lines.append("")
    for name in FUNCTIONS:
        for level in levels:
            floor_p50 = results[f"{name}/floor/{level}"]["p50_ms"]
            fork_p50 = results[f"{name}/template/{level}"]["p50_ms"]
            lines.append(
                f"{name} C={level}: floor p50 {floor_p50:.1f} ms / template p50 {fork_p50:.1f} ms = "
                f"{floor_p50 / fork_p50:.1f}x (target ≥ 5x)."
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", default="1,32")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the import benchmark needs root (cgroups, namespaces)")
    levels = [int(level) for level in args.levels.split(",")]
    cgroups.remove_tree(CGROUP_PARENT)
    with tempfile.TemporaryDirectory(prefix="hetfaas-imports-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        codes = {name: prepare(work, name, reqs, handler) for name, (reqs, handler) in FUNCTIONS.items()}
        runs = []
        for index in range(args.repeat):
            print(f"run {index + 1}/{args.repeat}", flush=True)
            runs.append(uvloop.run(one_run(levels, args.samples, work, codes)))
    results = median_cells(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "python_imports.json").write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "runs": runs})
    )
    print(report(results, levels))


if __name__ == "__main__":
    main()
