"""The Requester against a real nats-server: replies, deadlines, resent copies, lost peers."""

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
from nats.aio.msg import Msg

from deploy import launcher, services
from fabric import bus, serving
from fabric.connection import Connection
from schemas import codec, subjects
from schemas.messages import ErrorReply
from tests.integration.conftest import harness_creds, wait_until


@pytest.fixture
async def nc(cluster: launcher.ClusterInfo) -> AsyncIterator[Connection]:
    conn = await bus.connect(cluster.nats_url, "test-bus", creds=harness_creds(cluster))
    yield conn
    await conn.close()


async def responder(nc: Connection, subject: str, answer_copy: int | None) -> list[tuple[float, bytes]]:
    """Records each copy it gets (arrival time, body); answers the `answer_copy`-th (1-based)."""
    seen: list[tuple[float, bytes]] = []

    async def on_message(msg: Msg) -> None:
        seen.append((time.monotonic(), msg.data))
        if answer_copy is not None and len(seen) == answer_copy:
            await nc.publish(msg.reply, b"answer to " + msg.data)

    await nc.subscribe(subject, cb=on_message)
    await nc.flush()
    return seen


async def test_a_request_gets_its_reply(nc: Connection, tenant: str) -> None:
    await responder(nc, f"{tenant}.echo", answer_copy=1)
    reply = await bus.Requester(nc).request(f"{tenant}.echo", b"hi", 2.0, None, "peer")
    assert reply == b"answer to hi"


async def test_an_unanswered_request_times_out_at_its_deadline(nc: Connection, tenant: str) -> None:
    seen = await responder(nc, f"{tenant}.silent", answer_copy=None)
    started = time.monotonic()
    with pytest.raises(bus.RequestTimeout):
        await bus.Requester(nc).request(f"{tenant}.silent", b"x", 0.3, None, "peer")
    assert 0.28 <= time.monotonic() - started < 1.0
    assert len(seen) == 1, "without resend the request is sent once"


async def test_copies_go_out_after_the_wait_then_doubling_until_answered(nc: Connection, tenant: str) -> None:
    seen = await responder(nc, f"{tenant}.late", answer_copy=3)
    resend = bus.Resend(0.1, lambda n: f"copy {n}".encode())
    started = time.monotonic()
    reply = await bus.Requester(nc).request(f"{tenant}.late", b"copy 1", 5.0, None, "peer", resend)
    assert reply == b"answer to copy 3"
    assert [body for _, body in seen] == [b"copy 1", b"copy 2", b"copy 3"]
    first_copy, second_copy = (at - started for at, _ in seen[1:])
    # timers never fire early; a loaded machine may run them late
    assert 0.09 <= first_copy < 0.25, "the first copy after the wait"
    assert 0.19 <= second_copy - first_copy < 0.35, "the next after twice the wait"


async def test_copies_stop_when_the_sender_says_so_and_the_deadline_holds(
    nc: Connection, tenant: str
) -> None:
    seen = await responder(nc, f"{tenant}.never", answer_copy=None)
    resend = bus.Resend(0.05, lambda n: b"copy" if n <= 2 else None)
    with pytest.raises(bus.RequestTimeout):
        await bus.Requester(nc).request(f"{tenant}.never", b"first", 0.5, None, "peer", resend)
    assert [body for _, body in seen] == [b"first", b"copy"]


async def test_losing_the_peer_fails_its_requests_at_once(nc: Connection, tenant: str) -> None:
    await responder(nc, f"{tenant}.held", answer_copy=None)
    requester = bus.Requester(nc)
    waiting = [
        asyncio.create_task(requester.request(f"{tenant}.held", b"x", 30.0, None, "node-a")) for _ in range(3)
    ]
    assert await wait_until(lambda: requester.in_flight("node-a") == 3)
    assert requester.fail_peer("node-a") == 3
    for task in waiting:
        with pytest.raises(bus.PeerLost):
            await task
    assert requester.in_flight("node-a") == 0


async def test_nobody_listening_is_reported_at_once(nc: Connection, tenant: str) -> None:
    started = time.monotonic()
    with pytest.raises(bus.NoResponders):
        await bus.Requester(nc).request(f"{tenant}.nobody", b"x", 5.0, None, "peer")
    assert time.monotonic() - started < 1.0


def collect(into: list[bytes]):
    async def on_message(msg: Msg) -> None:
        into.append(msg.data)

    return on_message


class Ping(msgspec.Struct, frozen=True):
    n: int
    pad: bytes = b""


async def serve_answering_elsewhere(nc: Connection, subject: str, answers_to: str = "") -> bus.Server:
    """A service whose handler answers a third party and only acknowledges the requester, the
    way nodes answer callers directly and acknowledge the scheduler (in batches). With
    `answers_to` (a Requester's inbox prefix) each answer goes to the token of the same number
    as its request."""

    async def handler(req: Ping, ctx: bus.Context) -> bus.ReplyTo:
        where = f"{answers_to}{req.n}" if answers_to else f"{subject}.answers"
        return bus.ReplyTo(where, req, batch_ack=True)

    server = bus.Server(nc, max_concurrent=256)
    await server.serve([bus.Route(subject, msgspec.msgpack.Decoder(Ping), handler)])
    return server


async def test_acknowledgements_to_one_requester_go_in_batches(
    nc: Connection, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serving, "MAX_ACKS_PER_MESSAGE", 16)  # a long batch is split
    server = await serve_answering_elsewhere(nc, f"{tenant}.svc")
    requester = bus.Requester(nc)
    await requester.start()
    batches: list[bytes] = []
    answered: list[bytes] = []
    await nc.subscribe(f"{requester._prefix}{subjects.BATCH_TOKEN}", cb=collect(batches))
    await nc.subscribe(f"{tenant}.svc.answers", cb=collect(answered))

    calls = [requester.request(f"{tenant}.svc", codec.encode(Ping(n)), 5.0, None, "svc") for n in range(200)]
    replies = await asyncio.gather(*calls)

    assert replies == [b""] * 200, "every request acknowledged, empty"
    assert 0 < len(batches) < 200, "fewer messages than acknowledgements"
    decoded = [codec.acks.decode(body) for body in batches]
    tokens = [t for batch in decoded for t in batch.tokens]
    assert len(tokens) == len(set(tokens)) <= 200
    assert max(len(batch.tokens) for batch in decoded) <= 16
    assert await wait_until(lambda: len(answered) == 200), "and every answer went to the third party"
    await server.close()


async def test_a_lone_acknowledgement_is_a_plain_empty_reply(nc: Connection, tenant: str) -> None:
    server = await serve_answering_elsewhere(nc, f"{tenant}.one")
    reply = await nc.request(f"{tenant}.one", codec.encode(Ping(1)), timeout=5)  # nats-py's own request
    assert reply.data == b""
    await server.close()


async def test_malformed_acknowledgements_are_ignored(nc: Connection, tenant: str) -> None:
    await responder(nc, f"{tenant}.after", answer_copy=1)
    requester = bus.Requester(nc)
    await requester.start()
    await nc.publish(f"{requester._prefix}{subjects.BATCH_TOKEN}", b"\xc1 not msgpack")
    reply = await requester.request(f"{tenant}.after", b"still", 2.0, None, "peer")
    assert reply == b"answer to still"


async def test_a_reply_subject_of_one_token_gets_its_acknowledgement_alone(
    nc: Connection, tenant: str
) -> None:
    server = await serve_answering_elsewhere(nc, f"{tenant}.plain")
    inbox = f"{tenant}-plain-inbox"  # no dot: no inbox prefix to batch under
    acknowledged: list[bytes] = []
    await nc.subscribe(inbox, cb=collect(acknowledged))
    await nc.publish(f"{tenant}.plain", codec.encode(Ping(1)), reply=inbox)
    assert await wait_until(lambda: acknowledged == [b""])
    await server.close()


async def test_answers_go_to_the_caller_each_alone_while_acknowledgements_share_messages(
    nc: Connection, tenant: str
) -> None:
    """What a node does for a client: each answer to the client's inbox travels alone (batched,
    they moved a client's window as one wave: slower), the scheduler's acknowledgements together."""
    callers = bus.Requester(nc)
    await callers.start()
    server = await serve_answering_elsewhere(nc, f"{tenant}.direct", answers_to=callers._prefix)
    caller_batches: list[bytes] = []
    await nc.subscribe(f"{callers._prefix}{subjects.BATCH_TOKEN}", cb=collect(caller_batches))
    scheduler = bus.Requester(nc)
    await scheduler.start()
    ack_batches: list[bytes] = []
    await nc.subscribe(f"{scheduler._prefix}{subjects.BATCH_TOKEN}", cb=collect(ack_batches))
    await responder(nc, f"{tenant}.unused.*", answer_copy=None)  # hears the callers, never answers
    # The callers wait on their inbox (tokens 0..99) while the "scheduler" forwards each.
    waiting = [
        asyncio.create_task(callers.request(f"{tenant}.unused.{n}", b"", 5.0, None, "x")) for n in range(100)
    ]
    acks = await asyncio.gather(
        *(scheduler.request(f"{tenant}.direct", codec.encode(Ping(n)), 5.0, None, "svc") for n in range(100))
    )
    answers = await asyncio.gather(*waiting)

    assert acks == [b""] * 100
    assert [msgspec.msgpack.decode(a, type=Ping).n for a in answers] == list(range(100))
    assert caller_batches == [], "no answer waited for others"
    assert ack_batches, "acknowledgements shared messages"
    await server.close()


async def test_requests_beyond_the_handlers_wait_their_turn_and_past_the_backlog_hear_throttled(
    nc: Connection, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two handlers at once, two requests waiting: the fifth is refused at once, with a reason;
    the waiting ones run in arrival order when the first finish."""
    monkeypatch.setattr(serving, "MAX_BACKLOG", 2)
    release, started = asyncio.Event(), []

    async def handler(req: Ping, ctx: bus.Context) -> Ping:
        started.append(req.n)
        await release.wait()
        return req

    server = bus.Server(nc, max_concurrent=2)
    await server.serve([bus.Route(f"{tenant}.slow", msgspec.msgpack.Decoder(Ping), handler)])
    requester = bus.Requester(nc)
    calls: list[asyncio.Task[bytes]] = []
    for n in range(4):  # one at a time, so that they arrive in this order
        calls.append(
            asyncio.create_task(requester.request(f"{tenant}.slow", codec.encode(Ping(n)), 5.0, None, "s"))
        )
        assert await wait_until(lambda n=n: len(started) + len(server._backlog) == n + 1)
    refused = await requester.request(f"{tenant}.slow", codec.encode(Ping(4)), 5.0, None, "s")
    assert started == [0, 1], "two at once"
    error = codec.invoke_result.decode(refused)
    assert isinstance(error, ErrorReply) and error.error.code == "throttled"
    assert "2 requests are waiting" in error.error.message
    release.set()
    answers = await asyncio.gather(*calls[:4])
    assert [msgspec.msgpack.decode(a, type=Ping).n for a in answers] == [0, 1, 2, 3]
    assert started == [0, 1, 2, 3], "the waiting ones in arrival order"
    await server.close()


async def test_a_fast_path_takes_what_it_can_and_leaves_the_rest_to_the_handler(
    nc: Connection, tenant: str
) -> None:
    """Multiples of 3 are answered by the fast path at once (as a DPU node runs a warm program);
    other even numbers are taken and answered later by callback (as the scheduler does once its
    node acknowledges); odd ones go to the handler; a malformed request is answered by the
    handler's path; a fast path that raises is answered `internal`."""
    server = bus.Server(nc, max_concurrent=8)

    async def handler(req: Ping, ctx: bus.Context) -> Ping:
        return Ping(req.n, b"handler")

    def fast(req: Ping, ctx: bus.Context) -> Ping | bus.Pass | None:
        if req.n < 0:
            raise RuntimeError("the fast path broke")
        if req.n % 2:
            return bus.PASS
        if req.n % 3 == 0:
            return Ping(req.n, b"now")
        asyncio.get_running_loop().call_soon(bus.answer, nc, Ping(req.n, b"later"), ctx)
        return None

    subject = f"{tenant}.fast"
    await server.serve([bus.Route(subject, msgspec.msgpack.Decoder(Ping), handler, fast=fast)])
    requester = bus.Requester(nc)

    async def ask(body: bytes) -> bytes:
        return await requester.request(subject, body, 5.0, None, "s")

    answers = [msgspec.msgpack.decode(await ask(codec.encode(Ping(n))), type=Ping) for n in range(5)]
    assert [(a.n, a.pad) for a in answers] == [
        (0, b"now"),
        (1, b"handler"),
        (2, b"later"),
        (3, b"handler"),
        (4, b"later"),
    ]
    malformed = codec.invoke_result.decode(await ask(b"\xc1"))
    assert isinstance(malformed, ErrorReply) and malformed.error.code == "bad_request"
    broken = codec.invoke_result.decode(await ask(codec.encode(Ping(-1))))
    assert isinstance(broken, ErrorReply) and broken.error.code == "internal"
    assert "the fast path broke" in broken.error.message
    await server.close()


async def test_send_hands_each_outcome_to_its_callback_once(nc: Connection, tenant: str) -> None:
    """`Requester.send`, the callback form of `request`: a reply, a deadline, a lost peer and
    nobody listening each reach the callback once, and nothing is left waiting."""
    await responder(nc, f"{tenant}.answers", answer_copy=1)
    await responder(nc, f"{tenant}.silent", answer_copy=None)
    requester = bus.Requester(nc)
    await requester.start()
    outcomes: dict[str, list[bytes | BaseException]] = {}

    def send(name: str, subject: str, timeout_s: float, peer: str) -> None:
        outcomes[name] = []
        requester.send(subject, name.encode(), timeout_s, None, peer, outcomes[name].append)

    send("answered", f"{tenant}.answers", 5.0, "a")
    send("late", f"{tenant}.silent", 0.2, "b")
    send("lost", f"{tenant}.silent", 30.0, "c")
    send("nobody", f"{tenant}.nobody", 5.0, "d")
    assert await wait_until(lambda: requester.in_flight("c") == 1)
    assert requester.fail_peer("c") == 1
    assert await wait_until(lambda: all(outcomes.values()))
    assert outcomes["answered"] == [b"answer to answered"]
    kinds = {name: type(got[0]) for name, got in outcomes.items() if name != "answered"}
    assert kinds == {"late": bus.RequestTimeout, "lost": bus.PeerLost, "nobody": bus.NoResponders}
    assert all(len(got) == 1 for got in outcomes.values())
    assert not any(requester.in_flight(peer) for peer in "abcd")


async def test_a_failing_callback_does_not_cost_the_other_requests_their_outcomes(
    nc: Connection, tenant: str
) -> None:
    """Outcomes are handed out in batches (a lost peer, a message of acknowledgements): one
    callback that raises must not leave the others waiting for ever."""
    await responder(nc, f"{tenant}.silent", answer_copy=None)
    requester = bus.Requester(nc)
    await requester.start()
    got: list[bytes | BaseException] = []

    def broken(outcome: bytes | BaseException) -> None:
        raise RuntimeError("a caller's bug")

    for answer in (broken, got.append, broken, got.append):
        requester.send(f"{tenant}.silent", b"x", 30.0, None, "peer", answer)
    assert requester.fail_peer("peer") == 4
    assert [type(outcome) for outcome in got] == [bus.PeerLost, bus.PeerLost]
    assert requester.in_flight("peer") == 0


async def test_a_cancelled_request_leaves_nothing_waiting(nc: Connection, tenant: str) -> None:
    await responder(nc, f"{tenant}.silent", answer_copy=None)
    requester = bus.Requester(nc)
    call = asyncio.create_task(requester.request(f"{tenant}.silent", b"x", 30.0, None, "peer"))
    assert await wait_until(lambda: requester.in_flight("peer") == 1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert requester.in_flight("peer") == 0
    assert requester.fail_peer("peer") == 0


class OwnServer:
    """A nats-server of the test's own, to stop and start again on its port."""

    def __init__(self, tmp_path: Path):
        self.port = services.free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._dir = tmp_path
        self.process = self.start()

    def start(self) -> subprocess.Popen:
        d = self._dir
        self.process = services.start_nats(self.port, d / "data", d / "nats.conf", d / "nats.log")
        return self.process

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[OwnServer]:
    server = OwnServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


async def test_a_service_and_its_requester_carry_on_after_nats_server_restarts(own_server: OwnServer) -> None:
    """The inline subscriptions survive a reconnect: nats-py subscribes them again under the
    same ids, and the fast path still finds its handlers."""
    nc = await bus.connect(own_server.url, "test-restart")
    try:

        async def echo(req: Ping, ctx: bus.Context) -> Ping:
            return req

        server = bus.Server(nc, max_concurrent=8)
        await server.serve([bus.Route("restart.echo", msgspec.msgpack.Decoder(Ping), echo)])
        requester = bus.Requester(nc)
        before = await requester.request("restart.echo", codec.encode(Ping(1)), 5.0, None, "svc")
        own_server.stop()
        assert await wait_until(lambda: not nc.is_connected)
        own_server.start()
        assert await wait_until(lambda: nc.is_connected, timeout_s=15)
        await nc.flush()  # our subscriptions are back on the server once it has answered this
        after = await requester.request("restart.echo", codec.encode(Ping(2)), 5.0, None, "svc")
        assert [msgspec.msgpack.decode(r, type=Ping).n for r in (before, after)] == [1, 2]
        await server.close()
    finally:
        await nc.close()


async def test_requests_in_flight_are_sent_again_once_reconnected(own_server: OwnServer) -> None:
    """A reply sent while the link is down is lost (core NATS keeps nothing for an absent
    client): an idempotent request is sent again as soon as the connection is back, and its
    copy is answered; one that may not be sent twice waits out its deadline."""
    nc = await bus.connect(own_server.url, "test-again")
    try:
        seen: list[bytes] = []
        restarted = asyncio.Event()

        async def answer_after_the_restart(msg: Msg) -> None:
            seen.append(msg.data)
            if restarted.is_set():
                await nc.publish(msg.reply, b"answer to " + msg.data)

        await nc.subscribe("again.x", cb=answer_after_the_restart)
        requester = bus.Requester(nc)
        idempotent = asyncio.create_task(
            requester.request("again.x", b"same", 10.0, None, "p", idempotent=True)
        )
        once = asyncio.create_task(requester.request("again.x", b"once", 4.0, None, "p"))
        assert await wait_until(lambda: len(seen) == 2)
        own_server.stop()
        assert await wait_until(lambda: not nc.is_connected)
        restarted.set()
        own_server.start()
        assert await asyncio.wait_for(idempotent, 8.0) == b"answer to same"
        with pytest.raises(bus.RequestTimeout):
            await once
        assert sorted(seen) == [b"once", b"same", b"same"], "only the idempotent one was sent again"
    finally:
        await nc.close()


async def test_a_request_sent_again_to_a_peer_not_back_yet_is_asked_again_not_failed(
    own_server: OwnServer,
) -> None:
    """After a reconnect, "no responders" to a request sent again does not say the peer never
    had it: the peer may have taken the first and be reconnecting itself. Failed as
    NoResponders, the scheduler tried the invocation on another node, and it ran twice. It is
    asked again until the peer is back (and answers from the first), or declared lost."""
    nc = await bus.connect(own_server.url, "test-asked-again")
    peer = await bus.connect(own_server.url, "test-peer")
    try:
        seen: list[bytes] = []

        async def record(msg: Msg) -> None:
            seen.append(msg.data)

        await peer.subscribe("again.back", cb=record)
        await peer.subscribe("again.gone", cb=record)
        await peer.flush()
        requester = bus.Requester(nc)
        back = asyncio.create_task(requester.request("again.back", b"b", 20.0, None, "back", idempotent=True))
        gone = asyncio.create_task(requester.request("again.gone", b"g", 20.0, None, "gone", idempotent=True))
        assert await wait_until(lambda: sorted(seen) == [b"b", b"g"]), "the peer had the first copies"
        await peer.close()  # the peer is away (reconnecting, as far as the requester can tell)
        own_server.stop()
        assert await wait_until(lambda: not nc.is_connected)
        own_server.start()
        assert await wait_until(lambda: requester.asked_again == 2, 10.0), "both found nobody"
        assert not back.done() and not gone.done(), "not failed as NoResponders"
        again = await bus.connect(own_server.url, "test-peer-again")
        try:

            async def answer(msg: Msg) -> None:
                await again.publish(msg.reply, b"answer to " + msg.data)

            await again.subscribe("again.back", cb=answer)
            await again.flush()
            assert await asyncio.wait_for(back, 5.0) == b"answer to b"
        finally:
            await again.close()
        assert requester.fail_peer("gone") == 1
        with pytest.raises(bus.PeerLost):
            await gone
    finally:
        await nc.close()
        await peer.close()


@pytest.mark.parametrize("wait_for_server", [True, False])
async def test_a_list_of_servers_is_tried_in_turn(
    cluster: launcher.ClusterInfo, wait_for_server: bool
) -> None:
    """A service (waiting for ever) and a command-line client (trying each once) given a dead
    server among its servers reach the live one (the client tries them in a random order)."""
    dead = f"nats://127.0.0.1:{services.free_port()}"
    conn = await bus.connect(
        f"{dead}, {cluster.nats_url}", "test-servers", wait_for_server, creds=harness_creds(cluster)
    )
    try:
        assert conn.is_connected and conn.connected_url is not None
        assert conn.connected_url.port == int(cluster.nats_url.rsplit(":", 1)[1])
    finally:
        await conn.close()
