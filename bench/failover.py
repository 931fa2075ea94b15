"""Failover of a planned five-machine cluster (tests/integration/topology.py: network namespaces
as machines, `hetfaas machine run` on each) under a steady load: one process at a time is killed
with SIGKILL, and for each fault this reports the longest any invocation in flight at the kill
(or started in the 2 s after it) took, and the errors among them. The baseline is the same
window at a moment without a fault, in the same run.

    .venv/bin/python -m bench.failover [--workers 12] [--repeat 1] [--json FILE] [--keep]   (root)

Every failed call, and every call that ran more than once (counted from the nodes' function
logs), is listed with its invocation id and its time from the nearest fault; with --keep the
machines' directories (their logs) stay for a look.
"""

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

from tests.integration.conftest import make_function, wait_until
from tests.integration.lan import Lan, needs_namespaces
from tests.integration.topology import (
    ECHO,
    Call,
    FaultResult,
    Load,
    PlannedCluster,
    around,
    kill_one_at_a_time,
)

TIMEOUT_MS = 8_000


async def one_run(lab: PlannedCluster, workers: int, scratch: Path) -> list[FaultResult]:
    client = await lab.client("bench-failover")
    try:
        await client.wait_until_ready(3, schedulers=2, timeout_s=90)
        echo = make_function(
            scratch,
            "echo",
            'runtime = "python"\nhandler = "main:handle"\nconcurrency = 8\n',
            {"main.py": ECHO},
        )
        await client.deploy(echo, tenant="load")
        load = Load(client, "load", "echo", TIMEOUT_MS)
        running = asyncio.create_task(load.run(workers))
        await wait_until(lambda: len(load.calls) >= 200, 30)
        quiet = time.monotonic()
        await wait_until(lambda: load.calls[-1].started > quiet + 3, 20)
        results = [around(load.calls, quiet, "none (baseline)"), *await kill_one_at_a_time(lab, load)]
        load.stopping.set()
        await running
    finally:
        await client.close()
    total, failed = len(load.calls), sum(not c.outcome.ok for c in load.calls)
    runs = lab.runs_per_payload("load", "echo")
    twice = {payload for payload, n in runs.items() if n > 1}
    print(f"  {total} calls, {failed} failed ({100 * failed / total:.2f}%), ran twice: {len(twice)}")
    for call in load.calls:
        if call.payload in twice or not call.outcome.ok:
            print("   ", odd_call(call, runs.get(call.payload, 0), results))
    return results


def odd_call(call: Call, runs: int, faults: list[FaultResult]) -> str:
    """A failed or repeated call, placed in time against the nearest fault (for the logs)."""
    outcome = call.outcome
    nearest = min((f for f in faults if f.killed_at), key=lambda f: abs(call.started - f.killed_at))
    what = f"{outcome.error.code}: {outcome.error.message}" if outcome.error else "ok"
    return (
        f"{outcome.invocation_id} payload {call.payload} ran {runs}x, {what} (node {outcome.node or '-'}), "
        f"started {call.started - nearest.killed_at:+.2f} s from {nearest.fault}, "
        f"took {call.ended - call.started:.2f} s"
    )


def table(results: list[FaultResult]) -> str:
    lines = [
        "| fault (kill -9) | longest call around it | calls in the window | errors |",
        "|---|---|---|---|",
    ]
    for r in results:
        errors = ", ".join(f"{r.errors.count(code)} {code}" for code in sorted(set(r.errors))) or "0"
        lines.append(f"| {r.fault} | {r.worst_s:.2f} s | {r.calls} | {errors} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=12, help="callers invoking in a loop")
    parser.add_argument("--repeat", type=int, default=1, help="clusters started one after another")
    parser.add_argument("--restart-after", type=float, default=20.0, help="a killed role's pause")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the machines' directories (logs)")
    args = parser.parse_args()
    runs: list[list[dict]] = []
    try:
        needs_namespaces()
    except BaseException as exc:  # pytest's skip: say why and stop
        raise SystemExit(f"bench.failover: {exc}") from None
    for run in range(args.repeat):
        scratch = Path(tempfile.mkdtemp(prefix="hetfaas-failover-"))
        lan = Lan()
        lab = None
        try:
            lab = PlannedCluster(lan, scratch, args.restart_after)
            lab.start()
            asyncio.run(lab.until_healthy(90))
            print(f"run {run + 1}:")
            results = asyncio.run(one_run(lab, args.workers, scratch))
            runs.append([r.__dict__ for r in results])
            print(table(results))
        finally:
            if lab is not None:
                lab.stop()
            lan.close()
            if args.keep:
                print(f"  machines' directories kept in {scratch}")
            else:
                shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
