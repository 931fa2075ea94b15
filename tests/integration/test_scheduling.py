"""The scheduler under load with two replicas: limits per function and per tenant hold across
replicas, the bounded queue throttles, each invocation runs once however often the caller sends
it, replicas report themselves, and the keep-alive policy prewarms a regular function."""

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cli.client import Client, InvokeOutcome
from deploy import launcher
from tests.integration.conftest import (
    HOST_OVERRIDES,
    IDENTITY,
    SCHEDULER_OVERRIDES,
    make_function,
    most_at_once,
)
from tests.integration.test_cli import hetfaas

pytestmark = pytest.mark.integration

# Reports when it ran (wall clock: the same in every sandbox) so the test can count overlaps.
TIMED = """
import time

def handle(payload):
    started = time.time()
    time.sleep(float(payload or 0.3))
    return f"{started} {time.time()}"
"""
COUNTING = (
    "calls = 0\n\ndef handle(payload):\n    global calls\n    calls += 1\n    import time\n"
    "    time.sleep(0.6)\n    return str(calls)\n"
)
KEEP_ALIVE = {"bin_s": 0.2, "range_s": 5.0, "min_samples": 3, "margin": 0.3}
OVERRIDES = {
    **SCHEDULER_OVERRIDES,  # its admission settings replaced below
    "tracing": False,  # this cluster also shows that with tracing off nothing is written
    "beat_interval_s": 0.2,
    "admission": {"max_queue": 8, "max_queue_wait_ms": 6000},
    "keep_alive": KEEP_ALIVE,
}


STATE: dict[str, Path] = {}


@pytest.fixture(scope="module")
async def two_replicas(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Client]:
    os.environ.setdefault("OTEL_BSP_SCHEDULE_DELAY", "100")  # were anything traced, it would show fast
    STATE["dir"] = tmp_path_factory.mktemp("scheduling") / "state"
    info = launcher.up(
        STATE["dir"],
        hosts=2,
        schedulers=2,
        host_overrides={**HOST_OVERRIDES, "tracing": False},
        scheduler_overrides=OVERRIDES,
    )
    client = await Client.connect(info.nats_url, "scheduling-tests", creds=info.nats_creds)
    try:
        await client.wait_until_ready(2, schedulers=2, timeout_s=30)
        await wait_for_replicas(client, 2)
        yield client
    finally:
        await client.close()
        launcher.stop(info)


async def wait_for_replicas(client: Client, count: int) -> None:
    """Until the replicas hear each other's beats (they split limits by their count)."""
    async with asyncio.timeout(10):
        while True:
            if len((await client.status()).replicas) >= count:
                return
            await asyncio.sleep(0.05)


def ran_at_once(outcomes: list[InvokeOutcome]) -> int:
    intervals = [tuple(map(float, o.reply.output.split())) for o in outcomes if o.ok]
    return most_at_once(intervals)  # type: ignore[arg-type]


async def burst(
    client: Client, tenant: str, name: str, count: int, payload: bytes = b""
) -> list[InvokeOutcome]:
    return list(
        await asyncio.gather(*(client.invoke(tenant, name, payload, timeout_ms=15_000) for _ in range(count)))
    )


async def test_a_function_limit_holds_across_replicas(
    two_replicas: Client, tmp_path: Path, tenant: str
) -> None:
    manifest = 'runtime = "python"\nhandler = "main:handle"\nmax_concurrency = 3\n'
    await two_replicas.deploy(make_function(tmp_path, "limited", manifest, {"main.py": TIMED}), tenant=tenant)
    outcomes = await burst(two_replicas, tenant, "limited", 8, b"0.3")

    assert [o.error for o in outcomes if not o.ok] == []
    assert ran_at_once(outcomes) <= 3
    assert max(o.latency_ms for o in outcomes) > 550, "the ones beyond the limit waited in the queue"


async def test_a_tenant_limit_holds_across_its_functions(
    two_replicas: Client, tmp_path: Path, tenant: str
) -> None:
    await two_replicas.set_tenant(
        tenant, 2
    )  # the other replica's etcd watch has it long before the deploys end
    for name in ("one", "two"):
        fn = make_function(
            tmp_path, name, 'runtime = "python"\nhandler = "main:handle"\n', {"main.py": TIMED}
        )
        await two_replicas.deploy(fn, tenant=tenant)
    outcomes = [
        o
        for pair in await asyncio.gather(
            burst(two_replicas, tenant, "one", 4, b"0.2"), burst(two_replicas, tenant, "two", 4, b"0.2")
        )
        for o in pair
    ]

    assert [o.error for o in outcomes if not o.ok] == []
    assert ran_at_once(outcomes) <= 2


async def test_a_tenants_own_client_is_answered_after_a_hand_over(
    two_replicas: Client, tmp_path: Path, tenant: str
) -> None:
    """A tenant's own client sits in its own NATS account, so its requests arrive with a reply
    subject the server made (`_R_...`), which no client may pass on as a reply. A limit of 1 has
    one replica hand the other's invocations over: each must still be answered."""
    out = tmp_path / "own.creds"
    assert hetfaas(str(STATE["dir"]), "tenant", "create", tenant, "--out", str(out)).returncode == 0
    own = await Client.connect(two_replicas.nc.connected_url.geturl(), creds=str(out))
    try:
        manifest = 'runtime = "python"\nhandler = "main:handle"\nmax_concurrency = 1\n'
        await own.deploy(make_function(tmp_path, "single", manifest, {"main.py": TIMED}))
        outcomes = [
            await own.invoke(tenant, "single", b"0", timeout_ms=3000, retry_after_ms=0) for _ in range(8)
        ]
    finally:
        await own.close()
    assert [o.error for o in outcomes if not o.ok] == []


async def test_beyond_the_queue_invocations_are_throttled_at_once(
    two_replicas: Client, tmp_path: Path, tenant: str
) -> None:
    """A limit of 1 is held by one replica; the other hands its invocations over. That replica
    runs one, queues eight, and turns the rest away without making them wait."""
    manifest = 'runtime = "python"\nhandler = "main:handle"\nmax_concurrency = 1\n'
    await two_replicas.deploy(make_function(tmp_path, "single", manifest, {"main.py": TIMED}), tenant=tenant)
    outcomes = await burst(two_replicas, tenant, "single", 24, b"0.2")

    ok = [o for o in outcomes if o.ok]
    throttled = [o for o in outcomes if not o.ok]
    assert all(o.error.code == "throttled" and "queued" in o.error.message for o in throttled), throttled
    assert 2 <= len(ok) <= 9 and len(throttled) >= 15
    assert max(o.latency_ms for o in throttled) < 500, "refused at once, not after waiting"
    assert ran_at_once(ok) == 1


async def test_an_invocation_sent_again_runs_once(two_replicas: Client, tmp_path: Path, tenant: str) -> None:
    """The caller resends every 150 ms while the function runs (as it would after losing its
    scheduler): one answer comes back, and the function ran once. Each node holds at most one
    instance of it (concurrency 1), counting its calls: a second invocation counts 2 on the
    node that ran the first, 1 on the other, unless a copy of the first ran there too. (Which
    node the second goes to is placement's choice: the replica it reaches may not have heard
    yet that the first left an instance warm.)"""
    manifest = 'runtime = "python"\nhandler = "main:handle"\nconcurrency = 1\n'
    await two_replicas.deploy(make_function(tmp_path, "once", manifest, {"main.py": COUNTING}), tenant=tenant)
    first = await two_replicas.invoke(tenant, "once", b"", invocation_id=f"{tenant}-a", retry_after_ms=150)
    again = await two_replicas.invoke(tenant, "once", b"", invocation_id=f"{tenant}-b", retry_after_ms=0)

    assert first.ok and again.ok, (first.error, again.error)
    assert first.reply.output == b"1"
    expected = b"2" if again.node == first.node else b"1"
    assert again.reply.output == expected, f"a copy of the first ran too ({again.node}, {first.node})"


async def test_status_shows_every_replica(two_replicas: Client) -> None:
    status = await two_replicas.status()
    assert [r.scheduler_id for r in status.replicas] == ["scheduler-0", "scheduler-1"]
    assert all(r.etcd_ok and r.nodes_healthy == 2 and r.view_age_ms < 2000 for r in status.replicas)


async def test_a_regular_function_is_unloaded_then_prewarmed(
    two_replicas: Client, tmp_path: Path, tenant: str
) -> None:
    """Called every 0.8 s, a function's gaps all fall in one histogram bin: after each call its
    instance stops, and a fresh one is started ~0.56 s later, in time for the next call. The
    calls reach both replicas at random; each measures its gaps from the last call anywhere.
    A replica with fewer than `min_samples` gaps of its own applies the node's keep-alive (it
    keeps the instance), so 16 calls come before the 4 checked: with 10, a lopsided split left
    one replica short in up to one run in ten (seen here in full-suite runs)."""
    code = IDENTITY + "\ndef handle(payload):\n    return identity()\n"
    fn = make_function(
        tmp_path, "regular", 'runtime = "python"\nhandler = "main:handle"\n', {"main.py": code}
    )
    await two_replicas.deploy(fn, tenant=tenant)
    outcomes = []
    for _ in range(20):
        outcomes.append(await two_replicas.invoke(tenant, "regular", b""))
        await asyncio.sleep(0.8)  # the workload's own rhythm

    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    tail = outcomes[-4:]
    assert [o.reply.cold_start for o in tail] == [False] * 4, "each call found a prewarmed instance"
    identities = [json.dumps(o.reply.output.decode()) for o in tail]
    assert len(set(identities)) == 4, "each was a fresh instance: the one before was unloaded"


async def test_with_tracing_off_no_span_is_written(two_replicas: Client, tmp_path: Path, tenant: str) -> None:
    fn = make_function(tmp_path, "quiet", 'runtime = "python"\nhandler = "main:handle"\n', {"main.py": TIMED})
    await two_replicas.deploy(fn, tenant=tenant)
    outcome = await two_replicas.invoke(tenant, "quiet", b"0")
    # Absence has no event to await: give exporters five of their 100 ms flush periods (traced
    # clusters show their spans within one: tests/integration/test_tracing.py).
    await asyncio.sleep(0.5)

    assert outcome.ok
    written = [p.name for p in (STATE["dir"] / "traces").glob("*") if p.stat().st_size]
    assert written == [], "no process traced anything"
