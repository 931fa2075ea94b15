"""Two tenants on one cluster: does one tenant's flood starve the other? A "victim" tenant's
short calls, alone and then while a "flood" tenant holds hundreds of long calls, alternating.
Neither has a limit of its own (the defaults decide), or with `--own-limits N` both have limit N
(`hetfaas tenant set`), which may exceed what the nodes hold.

    .venv/bin/python -m bench.contention [--flood 500] [--flood-s 4.5] [--seconds 8] [--pairs 2]
        [--own-limits 1000] [--settle]
"""

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cli.client import Client
from deploy import launcher

SHORT = "def handle(payload):\n    return payload\n"
LONG = '#!/bin/sh\nsleep "$(cat)"\n'


@dataclass
class Run:
    calls: int
    ok: int
    p50_ms: float
    p99_ms: float

    @property
    def success(self) -> float:
        return self.ok / max(self.calls, 1)

    def line(self) -> str:
        return (
            f"{self.calls} calls, {self.success:.1%} ok, p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms"
        )


async def deploy(client: Client, work: Path, victim: str, flood: str) -> None:
    short, long = work / "short", work / "long"
    short.mkdir(parents=True, exist_ok=True)
    long.mkdir(parents=True, exist_ok=True)
    (short / "function.toml").write_text('name = "short"\nruntime = "python"\nhandler = "main:handle"\n')
    (short / "main.py").write_text(SHORT)
    (long / "function.toml").write_text(
        'name = "long"\nruntime = "exec"\ncommand = ["./long.sh"]\nmemory_mb = 16\ntimeout_ms = 60000\n'
    )
    (long / "long.sh").write_text(LONG)
    (long / "long.sh").chmod(0o755)
    await client.deploy(short, tenant=victim)
    await client.deploy(long, tenant=flood)


async def victim_calls(client: Client, tenant: str, seconds: float, in_flight: int = 8) -> Run:
    """Short calls, `in_flight` at a time, for `seconds`."""
    latencies: list[float] = []
    ok = 0
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal ok
        while time.monotonic() < stop_at:
            outcome = await client.invoke(tenant, "short", b"x", timeout_ms=10_000)
            latencies.append(outcome.latency_ms)
            ok += outcome.ok

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    latencies.sort()
    p99 = latencies[max(int(len(latencies) * 0.99) - 1, 0)]
    return Run(len(latencies), ok, statistics.median(latencies), p99)


async def flooded(
    client: Client, victim: str, flood: str, calls: int, hold_s: float, seconds: float, settle: bool = False
) -> Run:
    """The victim's run while `calls` long calls of the flood tenant are sent at once; with
    `settle`, from when the nodes run as many of them as they will (the sandboxes' starts,
    CPU the victim shares with the flood, behind it), else from the first."""
    floods = [
        asyncio.ensure_future(client.invoke(flood, "long", str(hold_s).encode(), timeout_ms=60_000))
        for _ in range(calls)
    ]
    try:
        if settle:
            await running_steadily(client)
        return await victim_calls(client, victim, seconds)
    finally:
        await asyncio.gather(*floods)


async def running_steadily(client: Client, timeout_s: float = 20.0) -> None:
    """Until the nodes' in-flight count stops rising (two heartbeats alike and above zero)."""
    async with asyncio.timeout(timeout_s):
        last = -1
        while True:
            inflight = sum(n.inflight for n in (await client.status()).nodes)
            if inflight == last and inflight > 0:
                return
            last = inflight
            await asyncio.sleep(0.3)  # a heartbeat interval or so: the nodes report in-flight


async def sitting(info: launcher.ClusterInfo, work: Path, args: argparse.Namespace) -> list[tuple[Run, Run]]:
    client = await Client.connect(info.nats_url, "bench-contention", creds=info.nats_creds)
    try:
        await client.wait_until_ready(args.hosts, timeout_s=30)
        await deploy(client, work, "victim", "flood")
        if args.own_limits:
            for tenant in ("victim", "flood"):
                await client.set_tenant(tenant, args.own_limits)
        await victim_calls(client, "victim", 1.0)  # warm-up: the victim's instances started
        pairs = []
        for _ in range(args.pairs):
            alone = await victim_calls(client, "victim", args.seconds)
            crowded = await flooded(
                client, "victim", "flood", args.flood, args.flood_s, args.seconds, settle=args.settle
            )
            pairs.append((alone, crowded))
        return pairs
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flood", type=int, default=500, help="long calls the flood tenant sends at once")
    parser.add_argument("--flood-s", type=float, default=4.5, help="how long each long call runs")
    parser.add_argument("--seconds", type=float, default=8.0, help="the victim's run, each time")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--own-limits", type=int, default=0, help="both tenants' own limit (0: none)")
    parser.add_argument(
        "--settle",
        action="store_true",
        help="measure the victim once the flood's calls run, not from the first",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hetfaas-bench-") as tmp:
        work = Path(tmp)
        info = launcher.up(work / "state", hosts=args.hosts)
        try:
            pairs = asyncio.run(sitting(info, work, args))
        finally:
            launcher.stop(info)
    limits = f"both limited to {args.own_limits}" if args.own_limits else "default limits"
    print(
        f"victim: 8 short calls in flight for {args.seconds:.0f} s; "
        f"flood: {args.flood} calls of {args.flood_s} s; {limits}"
    )
    for alone, crowded in pairs:
        print(f"  alone:   {alone.line()}")
        print(f"  flooded: {crowded.line()}  (p99 {crowded.p99_ms / alone.p99_ms:.1f}x alone)")


if __name__ == "__main__":
    main()
