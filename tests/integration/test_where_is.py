"""A caller's resend: the scheduler asks every node whether it has the invocation, against a real
nats-server, with stand-in nodes answering as the test tells them."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from nats.aio.msg import Msg

from deploy import launcher
from fabric import bus
from fabric.connection import Connection
from scheduler import shares
from scheduler.invoke import Invoker
from scheduler.settings import SchedulerSettings
from scheduler.view import ClusterView
from scheduler.where_is import SILENT
from schemas import codec, subjects
from schemas.messages import HaveIt, Heartbeat, InvokeRequest, NodeRecord
from tests.integration.conftest import harness_creds

# Answers a node gives: (has it, when to answer: awaited first). None: it says nothing.
Answer = tuple[bool, Callable[[], Awaitable[object]]] | None


@pytest.fixture
async def nc(cluster: launcher.ClusterInfo) -> AsyncIterator[Connection]:
    conn = await bus.connect(cluster.nats_url, "test-where-is", creds=harness_creds(cluster))
    yield conn
    await conn.close()


def invoker(nc: Connection, node_ids: list[str], timeout_ms: int) -> Invoker:
    """A scheduler's invoke path whose view holds `node_ids` healthy. (The shared cluster's own
    nodes answer too, as nodes it does not know: they do not count.)"""
    settings = SchedulerSettings(
        scheduler_id="t", nats_url="", etcd_endpoints=[], where_is_timeout_ms=timeout_ms
    )
    view = ClusterView()
    for node_id in node_ids:
        view.put_node(NodeRecord(node_id=node_id, kind="host", hostname="h", pid=1, capacity=8, started_at=0))
        view.on_heartbeat(
            Heartbeat(node_id=node_id, seq=0, inflight=0, capacity=8, instances=0), time.monotonic()
        )
    alone = shares.Replicas(("t",), "t")
    return Invoker(settings, nc, view, bus.Requester(nc), lambda: alone, lambda _: 100, lambda _: 1)


async def stand_in_nodes(nc: Connection, invocation_id: str, answers: dict[str, Answer]) -> None:
    """Nodes answering `where-is` for `invocation_id` as `answers` says."""
    replying: set[asyncio.Task[None]] = set()

    async def on_where_is(msg: Msg) -> None:
        if codec.where_is.decode(msg.data).invocation_id != invocation_id:
            return  # another test's question
        for node_id, answer in answers.items():
            if answer is not None:
                task = asyncio.ensure_future(reply(msg.reply, node_id, *answer))
                replying.add(task)
                task.add_done_callback(replying.discard)

    async def reply(inbox: str, node_id: str, has: bool, when: Callable[[], Awaitable[object]]) -> None:
        await when()
        await nc.publish(inbox, codec.encode(HaveIt(node_id=node_id, done=False, has=has)))

    await nc.subscribe(subjects.WHERE_IS, cb=on_where_is)
    await nc.flush()


def resend(tenant: str) -> InvokeRequest:
    return InvokeRequest(
        invocation_id=f"{tenant}-i", tenant=tenant, function="f", payload=b"", timeout_ms=5000, attempt=2
    )


async def now() -> None:
    pass


async def test_when_every_node_says_no_the_scheduler_stops_asking_at_once(
    nc: Connection, tenant: str
) -> None:
    """The deadline is long (30 s): the answer must come from the nodes' noes, not from it."""
    await stand_in_nodes(nc, f"{tenant}-i", {"n1": (False, now), "n2": (False, now)})
    async with asyncio.timeout(5):
        assert await invoker(nc, ["n1", "n2"], 30_000)._where_is(resend(tenant)) is None


async def test_a_node_slow_to_say_yes_is_waited_for(nc: Connection, tenant: str) -> None:
    """One node says no at once; the one that has it is loaded and answers 300 ms later, six
    times the budget the scheduler used to give (the invocation then ran twice). Its yes
    arrives after the no (one connection sends both, in order): the no settles nothing."""
    await stand_in_nodes(nc, f"{tenant}-i", {"n1": (False, now), "n2": (True, lambda: asyncio.sleep(0.3))})
    async with asyncio.timeout(5):
        assert await invoker(nc, ["n1", "n2"], 30_000)._where_is(resend(tenant)) == "n2"


async def test_a_node_that_says_nothing_costs_the_deadline_and_no_more(nc: Connection, tenant: str) -> None:
    """...and may have it (a node reconnecting to NATS hears no where-is): the copy is not
    placed elsewhere, where it would run twice."""
    await stand_in_nodes(nc, f"{tenant}-i", {"n1": (False, now), "n2": None})
    started = time.monotonic()
    assert await invoker(nc, ["n1", "n2"], 200)._where_is(resend(tenant)) == SILENT
    assert 0.19 <= time.monotonic() - started < 2.0
