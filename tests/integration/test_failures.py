"""Real failures: nodes and scheduler replicas killed with SIGKILL, leases expiring."""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.errors
import pytest

from cli.client import Client, ClientError, InvokeOutcome
from deploy import launcher
from schemas import keys, subjects
from tests.integration.conftest import HOST_OVERRIDES, make_function, most_at_once, start_cluster
from tests.integration.test_tracing import trace_of

pytestmark = pytest.mark.integration

# Echoes its payload, with when it ran (wall clock, the same in every sandbox) so the tests can
# check the function's concurrency limit from what really ran.
SLOW_ECHO = """
import json, time

def handle(p):
    start = time.time()
    time.sleep(0.1)
    return {"echo": p.decode(), "start": start, "end": time.time()}
"""
LIMIT = 12  # the function's max_concurrency: below the 16 callers, so it binds


@pytest.fixture
async def fresh(tmp_path: Path) -> AsyncIterator[tuple[launcher.ClusterInfo, Client]]:
    """A cluster of its own (2 hosts, 2 scheduler replicas): these tests break things."""
    info = start_cluster(tmp_path / "state", hosts=2, schedulers=2)
    client = await Client.connect(info.nats_url, "failure-tests", creds=info.nats_creds)
    try:
        await client.wait_until_ready(2, schedulers=2, timeout_s=30)
        fn = make_function(
            tmp_path,
            "slow",
            f'runtime = "python"\nhandler = "main:handle"\nconcurrency = 16\nmax_concurrency = {LIMIT}\n',
            {"main.py": SLOW_ECHO},
        )
        await client.deploy(fn, tenant="load")
        await every_replica_knows_functions(client, 1)
        yield info, client
    finally:
        await client.close()
        launcher.stop(info)


async def every_replica_knows_functions(client: Client, count: int) -> None:
    """Until every scheduler replica's view holds `count` functions: a deploy reaches the other
    replicas by etcd's watch, and a test that kills etcd right after it must not race that."""
    async with asyncio.timeout(10):
        while True:
            beats = (await client.status()).replicas
            if len(beats) == 2 and all(beat.functions >= count for beat in beats):
                return
            await asyncio.sleep(0.05)  # replicas beat every heartbeat interval: polled


async def test_node_key_disappears_when_its_lease_expires(fresh) -> None:
    info, _ = fresh
    async with launcher.operator_store(info) as store:
        _, revision = await store.list_prefix(keys.NODES)
        events = store.watch_prefix(keys.node("host-3"), revision + 1)
        launcher.start_host(info, 3, HOST_OVERRIDES)
        async with asyncio.timeout(20):
            registered = await anext(events)
        launcher.kill(info, "host-3")
        killed_at = time.monotonic()
        async with asyncio.timeout(20):
            expired = await anext(events)
        gone_after_s = time.monotonic() - killed_at

    assert [e.kind for e in registered] == ["put"]
    assert [(e.kind, e.key) for e in expired] == [("delete", keys.node("host-3"))]
    ttl = HOST_OVERRIDES["lease_ttl_s"]
    assert gone_after_s <= ttl + 1.5, f"key outlived its {ttl}s lease by too much ({gone_after_s:.1f}s)"


async def test_a_graceful_stop_deregisters_at_once(fresh) -> None:
    info, client = fresh
    async with launcher.operator_store(info) as store:
        launcher.terminate(info.processes["host-2"], Path(info.state_dir), timeout_s=10)
        assert await store.get(keys.node("host-2")) is None, "SIGTERM revoked the lease"
    outcome = await client.invoke("load", "slow", b"x")
    assert outcome.node == "host-1", outcome.error


Sent = tuple[str, InvokeOutcome]  # the payload sent, and what came back


async def run_load(
    client: Client,
    workers: int,
    per_worker: int,
    timeout_ms: int,
    midway: asyncio.Event,
    sent: list[Sent] | None = None,
) -> list[Sent]:
    """`workers` callers, each invoking `per_worker` times in a row; `midway` is set a third of
    the way; `sent` (if given) fills as answers come."""
    sent = [] if sent is None else sent

    async def worker(w: int) -> None:
        for i in range(per_worker):
            payload = f"{w}-{i}"
            sent.append(
                (payload, await client.invoke("load", "slow", payload.encode(), timeout_ms=timeout_ms))
            )
            if len(sent) == workers * per_worker // 3:
                midway.set()

    await asyncio.gather(*(worker(w) for w in range(workers)))
    return sent


def check_answers(sent: list[Sent], timeout_ms: int) -> list[InvokeOutcome]:
    """Every request answered once, before its deadline; each success is the answer to its own
    payload; the function never ran more than its limit at once. Returns the outcomes."""
    outcomes = [outcome for _, outcome in sent]
    assert [o.latency_ms for o in outcomes if o.latency_ms > timeout_ms] == [], "answered before the deadline"
    ran = [(payload, json.loads(o.reply.output)) for payload, o in sent if o.ok]
    assert [p for p, body in ran if body["echo"] != p] == [], "each answer is its own request's"
    assert most_at_once([(body["start"], body["end"]) for _, body in ran]) <= LIMIT
    return outcomes


async def load_until_midway(client: Client, timeout_ms: int) -> tuple["asyncio.Task[list[Sent]]", str]:
    """16 callers invoking 20 times each, a third of the way through; and the node that just
    answered: it has work in flight (at low load placement packs onto one node)."""
    midway = asyncio.Event()
    sent: list[Sent] = []
    load = asyncio.create_task(
        run_load(client, workers=16, per_worker=20, timeout_ms=timeout_ms, midway=midway, sent=sent)
    )
    await midway.wait()
    busy = sent[-1][1].node
    assert busy, sent[-1][1].error
    return load, busy


async def test_killing_a_node_under_load(fresh) -> None:
    info, client = fresh
    timeout_ms = 5_000
    load, busy = await load_until_midway(client, timeout_ms)
    survivor = "host-2" if busy == "host-1" else "host-1"
    launcher.kill(info, busy)
    outcomes = check_answers(await load, timeout_ms)

    failed = [o.error for o in outcomes if not o.ok]
    # What the dead node had may have run there: answered, not run again (at most once), so at
    # most the 16 callers' calls in flight fail; the rest go to the survivor.
    assert all(e.code == "unavailable" and "it may have run" in e.message for e in failed), failed
    assert len(failed) <= 16, failed
    after = [o for o in outcomes[len(outcomes) // 2 :] if o.ok]
    assert after and all(o.node == survivor for o in after[-50:])


async def test_a_live_node_whose_lease_lapses_finishes_what_it_runs(fresh) -> None:
    """A node's key can vanish while it lives (its lease lapsed: etcd changed leader, or its
    link to etcd broke for longer than the TTL). It still beats, so what it was running is not
    answered "may have run": it finishes, and the node registers again."""
    info, client = fresh
    timeout_ms = 5_000
    load, busy = await load_until_midway(client, timeout_ms)
    async with launcher.operator_store(info) as store:
        held = await store.get(keys.node(busy))
        assert held is not None
        _, revision = await store.list_prefix(keys.NODES)
        events = store.watch_prefix(keys.node(busy), revision + 1)
        await store._revoke(held.lease)
        async with asyncio.timeout(20):
            lapsed, again = await anext(events), await anext(events)
    outcomes = check_answers(await load, timeout_ms)

    assert [e.kind for e in lapsed] == ["delete"]
    assert [e.kind for e in again] == ["put"] and again[0].lease != held.lease, "registered again"
    assert [o.error for o in outcomes if not o.ok] == []
    assert len(outcomes) == 16 * 20


async def test_killing_a_scheduler_replica_under_load(fresh) -> None:
    """Requests the dead replica held are lost with it (core NATS is at-most-once); their
    callers send them again after 2 s, the surviving replica serves them, and a copy that
    reaches a node already running it joins that run. Every request: one answer, in time."""
    info, client = fresh
    before = await client.status()
    timeout_ms = 8_000
    midway = asyncio.Event()
    load = asyncio.create_task(
        run_load(client, workers=16, per_worker=12, timeout_ms=timeout_ms, midway=midway)
    )
    await midway.wait()
    launcher.kill(info, "scheduler-0")
    outcomes = check_answers(await load, timeout_ms)
    answered_by = {(await client.status()).answered_by for _ in range(5)}

    assert [s.scheduler_id for s in before.schedulers] == ["scheduler-0", "scheduler-1"]
    assert [o.error for o in outcomes if not o.ok] == []
    assert len(outcomes) == 16 * 12
    assert answered_by == {"scheduler-1"}


async def test_a_retried_invocation_is_one_trace_with_both_attempts(fresh) -> None:
    info, client = fresh
    first = await client.invoke("load", "slow", b"warm")
    await until_warm(client, first.node)  # so placement picks that node again
    launcher.kill(info, first.node)  # the schedulers learn it only when they try it
    await until_unsubscribed(info, first.node)
    retried = await client.invoke("load", "slow", b"again", timeout_ms=5_000)
    hops = {"scheduler.invoke", "scheduler.attempt", "node.invoke"}
    trace = trace_of(info.state_dir, retried.invocation_id, hops, root="scheduler.invoke")

    other = "host-2" if first.node == "host-1" else "host-1"
    attempts = sorted(
        (s for s in trace if s["name"] == "scheduler.attempt"), key=lambda s: s["startTimeUnixNano"]
    )
    assert retried.ok and retried.node == other and retried.reply.attempts == 2
    assert [(a["attrs"]["hetfaas.node"], a["attrs"]["hetfaas.attempt"]) for a in attempts] == [
        (first.node, "1"),
        (other, "2"),
    ]
    # "not listening": NATS noticed the closed connection before the request came (had the
    # request been in flight at the node's death, it would fail: it may have run there)
    assert attempts[0]["status"]["code"] == 2 and attempts[0]["status"]["message"].startswith(first.node)
    node = next(s for s in trace if s["name"] == "node.invoke")
    assert node["parentSpanId"] == attempts[1]["spanId"] and node["attrs"]["hetfaas.attempt"] == "2"


async def until_unsubscribed(info: launcher.ClusterInfo, node_id: str) -> None:
    """Until NATS has dropped the dead node's subscriptions. A killed node's socket closes only
    as its process finishes exiting (0.4-0.6 s here): a request sent before then is lost with it,
    and is answered "may have run" rather than retried."""
    nc = await nats.connect(info.nats_url, user_credentials=launcher.unrestricted_creds(info, "probe"))
    try:
        async with asyncio.timeout(10):
            while True:
                try:
                    await nc.request(subjects.node_invoke(node_id), b"", timeout=0.1)
                except nats.errors.NoRespondersError:
                    return
                except nats.errors.TimeoutError:
                    pass  # the request reached the dying connection: ask again
    finally:
        await nc.close()


async def until_warm(client: Client, node_id: str) -> None:
    """Until the schedulers' view (the node's heartbeats) shows a warm instance on `node_id`."""
    async with asyncio.timeout(10):
        while True:
            status = await client.status()
            if any(n.node_id == node_id and n.warm_idle for n in status.nodes):
                return
            await asyncio.sleep(0.05)


async def test_no_node_left(fresh) -> None:
    info, client = fresh
    launcher.kill(info, "host-1")
    launcher.kill(info, "host-2")
    outcome = await client.invoke("load", "slow", b"x", timeout_ms=3_000)
    assert outcome.error.code in ("unavailable", "timeout")
    assert outcome.latency_ms < 3_000


async def test_etcd_down_invocations_continue_deploys_fail_clearly_then_recover(
    fresh, tmp_path: Path
) -> None:
    info, client = fresh
    launcher.kill(info, "etcd")
    payloads = [f"still here {i}" for i in range(40)]
    answers = await asyncio.gather(
        *(client.invoke("load", "slow", p.encode(), timeout_ms=3_000) for p in payloads)
    )
    outcomes = check_answers(list(zip(payloads, answers, strict=True)), 3_000)
    fn = make_function(
        tmp_path, "new", 'runtime = "python"\nhandler = "main:handle"\n', {"main.py": SLOW_ECHO}
    )
    started = time.monotonic()
    with pytest.raises(ClientError) as refused:
        await client.deploy(fn, tenant="load")
    deploy_s = time.monotonic() - started

    launcher.start_etcd(info)
    await client.wait_until_ready(2, schedulers=2, timeout_s=20)  # registrations are back in etcd
    deployed = await client.deploy(fn, tenant="load")
    fresh_fn = await client.invoke("load", "new", b"back", timeout_ms=5_000)

    assert [o.error for o in outcomes if not o.ok] == []
    assert refused.value.error.code == "unavailable" and "etcd" in refused.value.error.message
    assert deploy_s < 10, "the refusal came before the client's own timeout"
    assert deployed.updated and fresh_fn.ok and json.loads(fresh_fn.reply.output)["echo"] == "back", (
        "caught up once etcd returned"
    )
