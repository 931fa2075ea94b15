"""Placement decision latency against the number of nodes in the snapshot.

Simulated clusters of 10, 100, 1 000 and 10 000 host nodes, loaded at random (a third of them
busy, a few holding the function warm), decided over by the scheduler's own framework and
plugins. Baseline, in the same run: a full scan that filters and scores every node (what a
placement without candidate sampling does). Also shown: building the snapshot, which happens at
most once per `snapshot_refresh_ms`, not per decision.

    .venv/bin/python -m bench.placement [--decisions 20000] [--sizes 10,100,1000,10000]
"""

import argparse
import random
import statistics
import time
from collections import Counter

from scheduler import framework, plugins
from scheduler.settings import PlacementSettings
from scheduler.snapshot import NodeInfo, Snapshot, build

FUNCTIONS = 200


def cluster(size: int, rng: random.Random) -> list[NodeInfo]:
    nodes = []
    for i in range(size):
        capacity = 64
        inflight = (
            rng.choice([capacity, rng.randrange(capacity)]) if rng.random() < 0.33 else rng.randrange(8)
        )
        warm = frozenset(f"t/f{rng.randrange(FUNCTIONS)}@d" for _ in range(rng.randrange(3)))
        nodes.append(NodeInfo(f"node-{i:05d}", "host", capacity, inflight, warm, free_slots=rng.randrange(6)))
    return nodes


def requests(count: int, rng: random.Random) -> list[framework.Request]:
    return [
        framework.Request(
            key=f"t/f{rng.randrange(FUNCTIONS)}@d",
            tenant="t",
            runtime="python",
            placement="host",
            salt=rng.getrandbits(32),
        )
        for _ in range(count)
    ]


def full_scan(req: framework.Request, snapshot: Snapshot, profile: framework.Profile, cycle: framework.Cycle):
    """Every node filtered and scored: the baseline."""
    best, best_score = None, -1.0
    for node in snapshot.rings["host"]:
        if all(check(req, node, cycle).fit is framework.Fit.YES for _, check in profile.filters):
            total = sum(score(req, node, cycle) * weight for _, score, weight in profile.scores)
            if total > best_score:
                best, best_score = node, total
    return best


def timed(decide, reqs: list[framework.Request]) -> list[float]:
    latencies = []
    for req in reqs:
        started = time.perf_counter_ns()
        decide(req)
        latencies.append((time.perf_counter_ns() - started) / 1000)
    return sorted(latencies)


def percentile(sorted_values: list[float], pct: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * pct / 100))]


def run(size: int, decisions: int, seed: int) -> dict:
    rng = random.Random(seed)
    nodes = cluster(size, rng)
    started = time.perf_counter()
    snapshot = build(nodes, 0.0)
    build_ms = (time.perf_counter() - started) * 1000
    profile = plugins.profile(PlacementSettings())
    held = Counter({n.node_id: n.inflight for n in nodes})  # this replica's own count decides capacity
    cycle = framework.Cycle(snapshot, held, {}, lambda total, _: total)
    reqs = requests(decisions, rng)
    sampled = timed(lambda r: framework.place(r, snapshot, profile, cycle, explain=False), reqs)
    scan_reqs = reqs[: max(200, decisions // max(1, size // 10))]  # the scan is slow at 10 000
    scanned = timed(lambda r: full_scan(r, snapshot, profile, cycle), scan_reqs)
    considered = statistics.mean(
        d.considered
        for d in (framework.place(r, snapshot, profile, cycle) for r in reqs[:2000])
        if isinstance(d, framework.Placed)
    )
    return {
        "nodes": size,
        "p50_us": percentile(sampled, 50),
        "p99_us": percentile(sampled, 99),
        "considered": considered,
        "scan_p50_us": percentile(scanned, 50),
        "scan_p99_us": percentile(scanned, 99),
        "snapshot_build_ms": build_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--sizes", default="10,100,1000,10000")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rows = [run(int(size), args.decisions, args.seed) for size in args.sizes.split(",")]
    base = rows[0]
    print(
        "| nodes | p50 µs | p99 µs | nodes looked at | p50 vs first row "
        "| full scan p50 / p99 µs | snapshot build ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['nodes']} | {row['p50_us']:.1f} | {row['p99_us']:.1f} | {row['considered']:.1f} "
            f"| {row['p50_us'] / base['p50_us']:.2f}x | {row['scan_p50_us']:.0f} / {row['scan_p99_us']:.0f} "
            f"| {row['snapshot_build_ms']:.2f} |"
        )


if __name__ == "__main__":
    main()
