"""A host node's fast path (`HostNode.on_invoke_now`, warm_call.py) with real python instances (plain child
processes, no NATS: the node's answers are caught where `bus.Server.respond` would send them).

A warm invocation goes to an idle instance as it is read, or waits in line for a busy one, and
is answered by callback; these check that it answers what the handler's path would have, in
every way an invocation can end."""

import asyncio
import hashlib
import time
from collections import defaultdict
from pathlib import Path

import pytest

from fabric import bus
from fabric.nodes import run_key
from host_node.bundle_cache import BundleCache
from host_node.sandbox.settings import SandboxSettings
from host_node.service import HostNode
from host_node.settings import HostNodeSettings
from host_node.spawner import PlainSpawner
from schemas.messages import ErrorReply, FunctionSpec, InvokeReply, NodeInvoke

HANDLER = """
import os, time
calls = 0

def handle(payload):
    global calls
    calls += 1
    if payload == b"raise":
        raise ValueError("asked to")
    if payload == b"die":
        os._exit(3)
    if payload.startswith(b"sleep:"):
        time.sleep(float(payload[6:]))
    return f"{os.getpid()} {calls} ".encode() + payload
"""
DIGEST = "sha256-" + hashlib.sha256(HANDLER.encode()).hexdigest()
CALLER = "_INBOX.caller.1"


class Answers:
    """Stands in for `bus.Server.respond`: each answer, by invocation id, as it is sent."""

    def __init__(self) -> None:
        self._sent: defaultdict[str, asyncio.Future[InvokeReply | ErrorReply]] = defaultdict(
            asyncio.get_running_loop().create_future
        )
        self.to_scheduler: set[str] = set()  # answered to the scheduler, not the caller

    def __call__(self, reply: object, ctx: bus.Context) -> None:
        if isinstance(reply, bus.ReplyTo):  # to the caller, acknowledged to the scheduler
            assert reply.subject == CALLER and reply.batch_ack, reply
            reply = reply.message
        else:  # to the scheduler: a refusal it retries elsewhere
            assert isinstance(reply, ErrorReply), reply
            self.to_scheduler.add(reply.invocation_id)
        assert isinstance(reply, InvokeReply | ErrorReply), reply
        self._sent[reply.invocation_id].set_result(reply)

    async def of(self, invocation_id: str) -> InvokeReply | ErrorReply:
        async with asyncio.timeout(10):
            return await self._sent[invocation_id]


@pytest.fixture
async def host(tmp_path: Path):
    code = tmp_path / "bundles" / DIGEST
    code.mkdir(parents=True)
    (code / "main.py").write_text(HANDLER)
    settings = HostNodeSettings(
        node_id="host-fast",
        nats_url="",
        etcd_endpoints=[],
        work_dir=str(tmp_path),
        tracing=False,
        shutdown_grace_s=0.5,
        sandbox=SandboxSettings(mode="plain"),
    )
    answers = Answers()
    node = HostNode(settings, BundleCache(None, tmp_path / "bundles"), PlainSpawner(), answers)  # type: ignore[arg-type]  # the bundle is there: no store
    yield node, answers
    await node.close()


def invoke(
    invocation_id: str, payload: bytes = b"hi", timeout_ms: int = 5000, fn_timeout_ms: int = 3000
) -> NodeInvoke:
    spec = FunctionSpec(
        name="echo",
        tenant="t",
        runtime="python",
        handler="main:handle",
        concurrency=1,
        timeout_ms=fn_timeout_ms,
    )
    return NodeInvoke(
        invocation_id=invocation_id,
        spec=spec,
        bundle_digest=DIGEST,
        payload=payload,
        timeout_ms=timeout_ms,
        reply_to=CALLER,
        batch_acks=True,
    )


def ctx() -> bus.Context:
    return bus.Context(
        subject="hetfaas.node.host-fast.invoke",
        headers=None,
        received_at=time.monotonic(),
        reply="_INBOX.s.1",
    )


async def warm_up(node: HostNode) -> int:
    """The first call starts the instance (a cold start: the handler's path); its pid."""
    req = invoke("cold")
    assert node.on_invoke_now(req, ctx()) is bus.PASS, "no instance yet: a cold start"
    reply = await node.on_invoke(req, ctx())
    assert isinstance(reply, bus.ReplyTo) and isinstance(reply.message, InvokeReply), reply
    assert reply.message.cold_start
    return int(reply.message.output.split()[0])


async def test_a_warm_invocation_is_answered_by_its_idle_instance(host) -> None:
    node, answers = host
    pid = await warm_up(node)
    assert node.on_invoke_now(invoke("w1"), ctx()) is None, "taken by the fast path"
    assert node.inflight == 1
    reply = await answers.of("w1")
    assert isinstance(reply, InvokeReply) and reply.output == f"{pid} 2 hi".encode()
    assert not reply.cold_start and reply.node == "host-fast"
    assert set(reply.phases_ms) == {"acquire_ms", "handler_ms"}
    assert node.inflight == 0 and node.runtime.warm.pool.idle_counts() == {node_key(): 1}, (
        "the instance is idle again"
    )


async def test_a_copy_that_comes_while_it_runs_gets_the_same_answer_and_runs_nothing(host) -> None:
    node, answers = host
    await warm_up(node)
    assert node.on_invoke_now(invoke("w1"), ctx()) is None
    assert node.on_invoke_now(invoke("w1"), ctx()) is bus.PASS, "a copy goes to the handler's path"
    copy = await node.on_invoke(invoke("w1"), ctx())
    first = await answers.of("w1")
    assert isinstance(copy, bus.ReplyTo) and copy.message == first
    assert first.output.split()[1] == b"2", "the handler ran once for both"  # type: ignore[union-attr]


async def test_invocations_beyond_the_instances_wait_in_line_and_run_in_order(host) -> None:
    node, answers = host
    pid = await warm_up(node)
    for i in range(3):
        assert node.on_invoke_now(invoke(f"q{i}", b"sleep:0.05"), ctx()) is None
    replies = [await answers.of(f"q{i}") for i in range(3)]
    assert [r.output for r in replies] == [f"{pid} {n} sleep:0.05".encode() for n in (2, 3, 4)]  # type: ignore[union-attr]
    waited = [r.phases_ms["acquire_ms"] for r in replies]  # type: ignore[union-attr]
    assert waited[0] < waited[1] and waited[1] >= 50 and waited[2] >= 100, (
        f"each waited for the one before: {waited}"
    )


async def test_a_handler_that_raises_answers_function_error_and_keeps_its_instance(host) -> None:
    node, answers = host
    pid = await warm_up(node)
    assert node.on_invoke_now(invoke("r", b"raise"), ctx()) is None
    reply = await answers.of("r")
    assert isinstance(reply, ErrorReply) and reply.error.code == "function_error"
    assert "ValueError: asked to" in reply.error.message
    assert node.on_invoke_now(invoke("after"), ctx()) is None
    assert (await answers.of("after")).output.split()[0] == str(pid).encode()  # type: ignore[union-attr]


async def test_a_function_past_its_timeout_is_stopped_and_one_waiting_for_it_times_out(host) -> None:
    node, answers = host
    await warm_up(node)
    assert node.on_invoke_now(invoke("slow", b"sleep:30", fn_timeout_ms=600), ctx()) is None
    assert node.on_invoke_now(invoke("queued", timeout_ms=200), ctx()) is None, "waits in line"
    queued = await answers.of("queued")
    assert isinstance(queued, ErrorReply) and queued.error.code == "timeout"
    assert "stayed busy" in queued.error.message
    assert not node.runtime.warm._waiters[node_key()], "it left the line"
    slow = await answers.of("slow")
    assert isinstance(slow, ErrorReply) and slow.error.code == "timeout"
    assert "did not return within 600 ms" in slow.error.message
    assert node.runtime.warm.pool.live(node_key()) == 0 and node.inflight == 0, "the instance was stopped"


async def test_an_instance_that_dies_mid_call_is_reported_and_the_next_in_line_gets_a_new_one(host) -> None:
    node, answers = host
    pid = await warm_up(node)
    assert node.on_invoke_now(invoke("die", b"die"), ctx()) is None
    assert node.on_invoke_now(invoke("next"), ctx()) is None, "waits in line"
    died = await answers.of("die")
    assert isinstance(died, ErrorReply) and died.error.code == "function_error"
    assert "exited with status 3" in died.error.message
    after = await answers.of("next")
    assert isinstance(after, InvokeReply) and after.cold_start, after
    assert after.output.split()[0] != str(pid).encode(), "a new instance"


async def test_stopping_the_node_lets_calls_finish_within_the_grace_then_stops_the_rest(host) -> None:
    node, answers = host
    await warm_up(node)
    assert node.on_invoke_now(invoke("quick", b"sleep:0.1"), ctx()) is None
    started = time.monotonic()
    await node.calls.stop(2.0)
    assert time.monotonic() - started < 1.5, "no longer than the call took"
    assert isinstance(await answers.of("quick"), InvokeReply)
    assert node.on_invoke_now(invoke("stuck", b"sleep:30"), ctx()) is None
    await node.calls.stop(0.1)
    stuck = await answers.of("stuck")
    assert isinstance(stuck, ErrorReply) and stuck.error.code == "unavailable"
    assert answers.to_scheduler == {"stuck"}, "the scheduler retries it elsewhere"
    assert node.inflight == 0 and node.runtime.warm.pool.live(node_key()) == 0


def node_key() -> str:
    from schemas.messages import instance_key

    return instance_key("t", "echo", DIGEST)


async def test_a_fault_of_the_node_s_own_answers_internal_and_leaves_nothing_held(host, monkeypatch) -> None:
    node, answers = host
    await warm_up(node)

    def broken(*args: object) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(node.runtime, "give_back", broken)
    assert node.on_invoke_now(invoke("f"), ctx()) is None
    reply = await answers.of("f")
    assert isinstance(reply, ErrorReply) and reply.error.code == "internal"
    assert "RuntimeError: injected" in reply.error.message
    assert node.inflight == 0 and not node.calls.live
    assert node.runtime.warm.pool.live(node_key()) == 0, "its instance, in an unknown state, was stopped"
    key = run_key(invoke("f"))
    assert node.once.has(key) and not node.once._answers[key].cancelled(), "a copy hears the same"
