"""Keep-alive policies on a synthetic trace: the scheduler's per-function histogram policy
(scheduler/keepalive.py, "Serverless in the Wild", USENIX ATC'20) against a fixed 10-minute
keep-alive, measured in the same run on the same arrivals.

The trace: functions over simulated days, in the mix the paper reports for Azure Functions:
timers (periodic, a little jitter), Poisson arrivals from once a minute to once a day, bursts
(calls a second apart, bursts far apart) and rare functions. The model is the paper's: one
instance per function; an invocation is cold when no instance is loaded at its arrival; memory
time is the time an instance spends loaded (idle, waiting for the next call). The histogram
policy is fed each function's arrivals online, exactly as the scheduler feeds it, and where it
says "no pattern" the node's own keep-alive (10 minutes) applies.

    .venv/bin/python -m bench.keepalive [--functions 400] [--days 3] [--seed 1]
"""

import argparse
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from scheduler.keepalive import Arrivals, KeepAlive
from scheduler.settings import KeepAliveSettings

DAY_S = 86_400.0
NODE_KEEP_ALIVE_S = 600.0  # the fixed baseline, and the node's default where the policy has none


def timer(rng: random.Random, days: float) -> list[float]:
    period = rng.choice([60, 300, 600, 900, 1800, 3600, 7200]) * 1.0
    start = rng.uniform(0, period)
    return [start + i * period + rng.gauss(0, period * 0.01) for i in range(int(days * DAY_S / period))]


def poisson(rng: random.Random, days: float) -> list[float]:
    mean_gap = 10 ** rng.uniform(1.8, 4.9)  # ~a minute to ~a day
    t, out = 0.0, []
    while (t := t + rng.expovariate(1 / mean_gap)) < days * DAY_S:
        out.append(t)
    return out


def bursty(rng: random.Random, days: float) -> list[float]:
    mean_gap = rng.uniform(1200, 3 * 3600)
    t, out = 0.0, []
    while (t := t + rng.expovariate(1 / mean_gap)) < days * DAY_S:
        out += [t + i * rng.uniform(0.5, 2.0) for i in range(rng.randrange(3, 40))]
    return sorted(out)


def rare(rng: random.Random, days: float) -> list[float]:
    return sorted(rng.uniform(0, days * DAY_S) for _ in range(rng.randrange(1, int(4 * days) + 2)))


KINDS: list[tuple[str, float, Callable[[random.Random, float], list[float]]]] = [
    ("timer", 0.3, timer),
    ("poisson", 0.35, poisson),
    ("bursty", 0.2, bursty),
    ("rare", 0.15, rare),
]


@dataclass
class Outcome:
    invocations: int = 0
    cold: int = 0
    memory_s: float = 0.0

    def add(self, other: "Outcome") -> None:
        self.invocations += other.invocations
        self.cold += other.cold
        self.memory_s += other.memory_s


def simulate(arrivals: list[float], policy_after: Callable[[float], KeepAlive]) -> Outcome:
    """One instance per function. After each call the policy says: keep it for keep_alive_s, or
    unload it and load it again prewarm_after_s later for keep_alive_s."""
    outcome = Outcome()
    loaded_from, loaded_until = 0.0, -1.0  # when the instance is loaded (none yet)
    for i, t in enumerate(arrivals):
        outcome.invocations += 1
        if not loaded_from <= t <= loaded_until:
            outcome.cold += 1
        policy = policy_after(t)
        keep = policy.keep_alive_s or NODE_KEEP_ALIVE_S
        loaded_from = t + policy.prewarm_after_s
        loaded_until = loaded_from + keep
        ends = arrivals[i + 1] if i + 1 < len(arrivals) else loaded_until
        outcome.memory_s += max(0.0, min(loaded_until, ends) - loaded_from)  # idle, loaded time
    return outcome


LONGER_FIXED_MIN = (20, 30, 60)  # for context: what a fixed keep-alive buys with more memory


def fixed_policy(seconds: float) -> Callable[[float], KeepAlive]:
    return lambda t: KeepAlive(0.0, seconds, "fixed")


def run(functions: int, days: float, seed: int) -> dict:
    rng = random.Random(seed)
    settings = KeepAliveSettings()
    policies = ["fixed 10 min", "histogram (hybrid)", *(f"fixed {m} min" for m in LONGER_FIXED_MIN)]
    totals = {p: Outcome() for p in policies}
    per_function: dict[str, list[float]] = {p: [] for p in policies}
    by_kind: dict[str, tuple[Outcome, Outcome]] = {name: (Outcome(), Outcome()) for name, _, _ in KINDS}
    for _ in range(functions):
        name, _, make = rng.choices(KINDS, weights=[w for _, w, _ in KINDS])[0]
        arrivals = sorted(a for a in make(rng, days) if a >= 0)
        if not arrivals:
            continue
        outcomes = {
            "fixed 10 min": simulate(arrivals, fixed_policy(NODE_KEEP_ALIVE_S)),
            "histogram (hybrid)": simulate(arrivals, Arrivals(settings).record),
            **{f"fixed {m} min": simulate(arrivals, fixed_policy(m * 60.0)) for m in LONGER_FIXED_MIN},
        }
        for policy, outcome in outcomes.items():
            totals[policy].add(outcome)
            per_function[policy].append(outcome.cold / outcome.invocations)
        by_kind[name][0].add(outcomes["fixed 10 min"])
        by_kind[name][1].add(outcomes["histogram (hybrid)"])
    return {"totals": totals, "per_function": per_function, "by_kind": by_kind}


def p75(values: list[float]) -> float:
    return statistics.quantiles(values, n=4)[2]


def report(results: dict, functions: int, days: float) -> str:
    totals: dict[str, Outcome] = results["totals"]
    fixed = totals["fixed 10 min"]
    lines = [
        f"{functions} functions, {days:g} simulated days, {fixed.invocations} invocations",
        "",
        "| policy | cold starts | cold-start rate | p75 per-function cold-start rate "
        "| idle memory (instance-hours) | memory vs fixed 10 min |",
        "|---|---|---|---|---|---|",
    ]
    for name, outcome in totals.items():
        lines.append(
            f"| {name} | {outcome.cold} | {outcome.cold / outcome.invocations:.2%} "
            f"| {p75(results['per_function'][name]):.1%} | {outcome.memory_s / 3600:.0f} "
            f"| {outcome.memory_s / fixed.memory_s:.0%} |"
        )
    lines += [
        "",
        "| kind | invocations | cold starts: fixed 10 min → histogram "
        "| idle memory h: fixed 10 min → histogram |",
        "|---|---|---|---|",
    ]
    for kind, (a, b) in results["by_kind"].items():
        if a.invocations:
            memory = f"{a.memory_s / 3600:.0f} → {b.memory_s / 3600:.0f}"
            lines.append(f"| {kind} | {a.invocations} | {a.cold} → {b.cold} | {memory} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--functions", type=int, default=400)
    parser.add_argument("--days", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(report(run(args.functions, args.days, args.seed), args.functions, args.days))


if __name__ == "__main__":
    main()
