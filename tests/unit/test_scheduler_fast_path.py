"""The scheduler's fast path against a stand-in bus: what the caller hears, and that every
invocation gives back what it took (its admission slot, its node's capacity), whatever the node
answered. (tests/integration covers it on a real cluster: retries, traces, node loss.)"""

import asyncio
import time
from collections.abc import Callable

import msgspec

from fabric import bus
from scheduler import shares
from scheduler.invoke import Invoker
from scheduler.settings import SchedulerSettings
from scheduler.view import ClusterView
from schemas import codec
from schemas.errors import Error
from schemas.messages import (
    ErrorReply,
    FunctionRecord,
    FunctionSpec,
    Heartbeat,
    InvokeRequest,
    NodeRecord,
)

Outcome = bytes | BaseException


class Bus:
    """Stands in for the NATS connection and the requester: the node's outcome comes in the
    next loop turn; what is published to callers is kept."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.published: list[tuple[str, bytes]] = []

    def send(self, subject: str, data: bytes, timeout_s: float, *rest: object, **options: object) -> str:
        answer: Callable = rest[2]  # type: ignore[assignment]  # (headers, peer, answer)
        asyncio.get_running_loop().call_soon(answer, self.outcome)
        return "token"

    def publish_now(self, subject: str, payload: bytes, reply: str = "", headers: object = None) -> None:
        self.published.append((subject, payload))


def invoker(outcome: Outcome) -> tuple[Invoker, Bus]:
    settings = SchedulerSettings(scheduler_id="s", nats_url="", etcd_endpoints=[])
    view = ClusterView()
    record = NodeRecord(node_id="host-1", kind="host", hostname="h", pid=1, capacity=8, started_at=0)
    view.put_node(record)
    beat = Heartbeat(node_id="host-1", seq=0, inflight=0, capacity=8, instances=0)
    view.on_heartbeat(beat, time.monotonic())
    stand_in = Bus(outcome)
    alone = shares.Replicas(("s",), "s")
    invoker = Invoker(settings, stand_in, view, stand_in, lambda: alone, lambda _: 100, lambda _: 1)  # type: ignore[arg-type]
    return invoker, stand_in


SPEC = FunctionSpec(name="f", tenant="t", runtime="python", handler="main:handle")
RECORD = FunctionRecord(spec=SPEC, bundle_digest="sha256-b", bundle_size=1, deployed_at=0)


async def invoke(invoker: Invoker, n: int = 1) -> None:
    req = InvokeRequest(invocation_id=f"i{n}", tenant="t", function="f", payload=b"", timeout_ms=5000)
    now = time.monotonic()
    ctx = bus.Context(subject="hetfaas.invoke.t.f", headers=None, received_at=now, reply="_INBOX.c.1")
    assert invoker.try_now(req, RECORD, ctx), "a warm invocation with room takes the fast path"
    await asyncio.sleep(0)  # the stand-in node's outcome, delivered in the next loop turn


def gave_everything_back(invoker: Invoker) -> bool:
    return invoker.gate.running.total == 0 and not invoker._handling and not invoker._view.held


async def test_a_node_that_answered_the_caller_leaves_nothing_to_relay() -> None:
    inv, stand_in = invoker(b"")  # the empty acknowledgement
    await invoke(inv)
    assert stand_in.published == [] and gave_everything_back(inv)


async def test_a_node_s_error_is_relayed_to_the_caller_as_it_came() -> None:
    failed = ErrorReply(error=Error(code="function_error", message="raised"), invocation_id="i1")
    refusal = codec.encode(failed)
    inv, stand_in = invoker(refusal)
    await invoke(inv)
    assert stand_in.published == [("_INBOX.c.1", refusal)] and gave_everything_back(inv)


async def test_a_malformed_answer_from_the_node_is_an_internal_error_and_costs_nothing_else() -> None:
    malformed = b"\x81" + msgspec.msgpack.encode({"type": "error"})[1:] + b"\xc1"  # an error's tag, then junk
    inv, stand_in = invoker(malformed)
    await invoke(inv)
    [(subject, body)] = stand_in.published
    answer = codec.invoke_result.decode(body)
    assert subject == "_INBOX.c.1" and isinstance(answer, ErrorReply) and answer.error.code == "internal"
    assert gave_everything_back(inv)
    stand_in.outcome = b""
    await invoke(inv, 2)  # and the next invocation is served as usual
    assert gave_everything_back(inv)


async def test_a_node_that_timed_out_gives_the_caller_a_timeout() -> None:
    inv, stand_in = invoker(bus.RequestTimeout("host-1 did not answer in time"))
    await invoke(inv)
    [(_, body)] = stand_in.published
    answer = codec.invoke_result.decode(body)
    assert isinstance(answer, ErrorReply) and answer.error.code == "timeout" and answer.node == "host-1"
    assert gave_everything_back(inv)


async def test_a_copy_is_dropped_only_when_the_first_copys_answer_reaches_its_reply() -> None:
    """A copy to the same inbox gets the first copy's answer; a copy from a tenant's account has a
    reply subject of its own (the server makes one per request, and the first one's may be gone
    with a connection it closed), so it is served, not dropped."""
    inv, _ = invoker(bus.RequestTimeout("never answered"))
    inv._handling["i9"] = "_R_.first.1"  # the first copy is being handled
    copy = InvokeRequest(
        invocation_id="i9", tenant="t", function="f", payload=b"", timeout_ms=5000, attempt=2
    )
    assert inv.is_resent(copy, "_R_.first.1") and inv.counters.resent == 1
    assert not inv.is_resent(copy, "_R_.second.2")
    inv._stop_handling("i9", "_R_.second.2")  # a later copy ending leaves the first's entry be
    assert inv._handling == {"i9": "_R_.first.1"}
    inv._stop_handling("i9", "_R_.first.1")
    assert gave_everything_back(inv)
