"""NATS plumbing: connecting, serving a typed handler table, and requests with explicit deadlines.

`serve` is the one place that decodes requests, maps handler exceptions to `internal` error
replies and bounds concurrency; services only write `async def on_x(req, ctx) -> Reply`.
"""

import asyncio
import itertools
import logging
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import msgspec
import nats
import nats.errors

from fabric.connection import STATUS, Connection, Deliver
from fabric.deadlines import Deadlines
from fabric.tasks import TaskSet
from schemas import codec, subjects
from schemas.codec import encode
from schemas.errors import Error
from schemas.messages import Acks, ErrorReply

log = logging.getLogger(__name__)

NO_RESPONDERS_STATUS = "503"
MAX_ACKS_PER_MESSAGE = 4096  # a batch of acknowledgements stays far under NATS's max_payload


class RequestTimeout(asyncio.TimeoutError):
    """No reply before the request's deadline."""


class NoResponders(ConnectionError):
    """Nobody subscribes to the subject: the peer is gone (NATS answers at once with status 503)."""


class PeerLost(ConnectionError):
    """The peer was declared dead while the request was in flight."""


async def connect(url: str, name: str, wait_for_server: bool = True) -> Connection:
    """Connect to NATS. Services wait for the server and reconnect for ever (`wait_for_server`);
    a command-line client fails at once with NoServersError, so the user hears it."""
    nc = Connection()
    await nc.connect(
        url,
        name=name,
        connect_timeout=2,
        reconnect_time_wait=0.25,  # type: ignore[arg-type]  # typed int, sleeps any float
        max_reconnect_attempts=-1 if wait_for_server else 1,  # 0 would mean "for ever" here too
        allow_reconnect=wait_for_server,
        ping_interval=10,
        max_outstanding_pings=3,
        # nats-py's default logs a full traceback for every failed attempt; a client reports the
        # final NoServersError instead.
        error_cb=_log_connection_error if wait_for_server else _ignore_connection_error,
    )
    return nc


async def _log_connection_error(exc: Exception) -> None:
    log.warning("NATS connection: %s", exc or type(exc).__name__)


async def _ignore_connection_error(exc: Exception) -> None:
    pass


async def close(nc: Connection) -> None:
    """Drain (deliver what is in flight, then close); a connection already closed is fine."""
    if not nc.is_closed:
        try:
            await nc.drain()
        except nats.errors.Error as exc:
            log.warning("closing the NATS connection: %s", exc)


class Context(msgspec.Struct, frozen=True, kw_only=True):
    """What a handler may know about the message beyond its body. (A Struct, not a frozen
    dataclass: one is made per message, and a frozen dataclass costs ~10x as much to make.)"""

    subject: str
    headers: dict[str, str] | None  # carries `traceparent` when the sender traces
    received_at: float  # time.monotonic() when the callback ran
    reply: str  # where the requester waits for the answer ("" for a plain publish)


class ReplyTo(msgspec.Struct, frozen=True):
    """A handler's answer that goes to a third party: `message` to `subject`, then an empty
    acknowledgement to the requester (the scheduler lets nodes answer clients directly). With
    `batch_ack` the acknowledgement joins the others of this loop iteration to the same inbox,
    in one `Acks` message (its reader said it reads them)."""

    subject: str
    message: msgspec.Struct
    batch_ack: bool = False


# A handler returns a reply Struct, bytes already encoded (a relayed reply), a ReplyTo, or None.
Handler = Callable[[Any, Context], Awaitable[msgspec.Struct | bytes | ReplyTo | None]]
# An inline route's handler: runs as the message is read, returns nothing, never awaits.
InlineHandler = Callable[[Any, Context], None]


class Pass:
    """What a fast path returns when it does not take the request (see `Route.fast`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "bus.PASS"


PASS = Pass()
# A route's fast path, tried as the message is read: PASS to leave the request to the route's
# handler; otherwise it took it: a reply to send now (as a handler's), or None (nothing now: it
# answers later itself, with `answer`, or `Server.respond` for a ReplyTo).
FastHandler = Callable[[Any, Context], "msgspec.Struct | bytes | ReplyTo | Pass | None"]

MAX_BACKLOG = 65536  # requests waiting for a free slot; beyond, a service answers `throttled`


@dataclass(frozen=True)
class Route:
    """One row of a service's handler table."""

    subject: str
    decoder: msgspec.msgpack.Decoder
    handler: Handler | InlineHandler
    queue: str = ""
    # Inline routes run as each message is read (no task): only for cheap handlers that never
    # await, such as heartbeats, which must stay in order and never reply.
    inline: bool = False
    # Eager routes start their handler at once and take a task only if it waits: for handlers
    # that usually finish without waiting (see TaskSet.spawn_eagerly).
    eager: bool = False
    # Tried first when a slot is free, as the message is read: for requests that usually need
    # no waiting, answered at once or, when the answer comes later, by callback (`Requester.send`)
    # instead of a task held open. `bench/hops.py`: 24 -> 15 µs of a forwarder's CPU per request.
    fast: FastHandler | None = None


@dataclass
class Server:
    """The subscriptions of one service; `close()` drains them and waits for running handlers.

    At most `max_concurrent` handlers run at once; requests beyond wait in arrival order, up to
    MAX_BACKLOG, and past that are answered `throttled` rather than dropped unheard."""

    nc: Connection
    max_concurrent: int
    tasks: TaskSet = field(default_factory=TaskSet)
    subscriptions: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._running = 0
        self._backlog: deque[tuple[Route, bytes, Context]] = deque()
        self._closing = False
        # batched-replies subject -> the reply tokens acknowledged, sent once per loop iteration
        self._acks: dict[str, list[str]] = {}

    async def serve(self, routes: list[Route]) -> None:
        for route in routes:
            sub = await self.nc.subscribe_inline(route.subject, self._deliverer(route), route.queue)
            self.subscriptions.append(sub)
        await self.nc.flush(timeout=5)

    def _deliverer(self, route: Route) -> Deliver:
        def deliver(subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
            ctx = Context(subject=subject, headers=headers, received_at=time.monotonic(), reply=reply)
            if route.inline:
                _run_inline(route, data, ctx)
            elif self._running < self.max_concurrent:
                if route.fast is None or not self._took_fast(route, data, ctx):
                    self._start(route, data, ctx)
            else:
                self._wait_for_a_slot(route, data, ctx)

        return deliver

    def _took_fast(self, route: Route, data: bytes, ctx: Context) -> bool:
        """Whether the route's fast path took the request. A malformed one is left to the
        handler's path, which answers it. A fast path that raises is answered as a failing
        handler is (it may have sent work on already: running it again could run it twice)."""
        try:
            request = route.decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return False
        assert route.fast is not None
        try:
            reply = route.fast(request, ctx)
        except Exception as exc:
            reply = _internal_error(request, ctx, exc)
        if reply is PASS:
            return False
        self.respond(reply, ctx)  # type: ignore[arg-type]  # not PASS
        return True

    def _start(self, route: Route, data: bytes, ctx: Context) -> None:
        self._running += 1
        handling = self._handle_and_release(route, data, ctx)
        if route.eager:
            self.tasks.spawn_eagerly(handling, ctx.subject)
        else:
            self.tasks.spawn(handling)

    def _wait_for_a_slot(self, route: Route, data: bytes, ctx: Context) -> None:
        if len(self._backlog) < MAX_BACKLOG:
            self._backlog.append((route, data, ctx))
            return
        why = f"{len(self._backlog)} requests are waiting here already"
        log.warning("refused a request on %s: %s", ctx.subject, why)
        if ctx.reply:
            self.nc.publish_now(ctx.reply, encode(ErrorReply(error=Error(code="throttled", message=why))))

    async def _handle_and_release(self, route: Route, data: bytes, ctx: Context) -> None:
        try:
            self.respond(await dispatch(route, data, ctx), ctx)
        finally:
            self._running -= 1
            if self._backlog and not self._closing:
                self._start(*self._backlog.popleft())

    def respond(self, reply: msgspec.Struct | bytes | ReplyTo | None, ctx: Context) -> None:
        """Send a handler's answer: what a fast path that answers later (it returned None) calls."""
        if isinstance(reply, ReplyTo):
            self.nc.publish_now(reply.subject, encode(reply.message))
            if reply.batch_ack and ctx.reply and self._batch_ack(ctx.reply):
                return
            reply = b""
        answer(self.nc, reply, ctx)

    def _batch_ack(self, reply: str) -> bool:
        """Queue an acknowledgement to `reply` (False: it goes alone: `reply` has no inbox to
        share); the first of a loop iteration schedules the sending."""
        batch = subjects.batched(reply)
        if batch is None:
            return False
        if not self._acks:
            asyncio.get_running_loop().call_soon(self._send_acks)
        self._acks.setdefault(batch[0], []).append(batch[1])
        return True

    def _send_acks(self) -> None:
        """Runs after the handlers of this loop iteration: one message per inbox (a lone
        acknowledgement goes as the plain empty reply it would have been)."""
        acks, self._acks = self._acks, {}
        for subject, tokens in acks.items():
            for start in range(0, len(tokens), MAX_ACKS_PER_MESSAGE):
                chunk = tokens[start : start + MAX_ACKS_PER_MESSAGE]
                try:
                    if len(chunk) == 1:
                        self.nc.publish_now(subject.removesuffix(subjects.BATCH_TOKEN) + chunk[0], b"")
                    else:
                        self.nc.publish_now(subject, encode(Acks(tokens=chunk)))
                except nats.errors.Error as exc:  # one requester's bad subject must not cost the others
                    log.warning("%d acknowledgements to %s not sent: %s", len(chunk), subject, exc)

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop taking messages, give running handlers `grace_s` to finish, then cancel the rest
        (requests still waiting for a slot are dropped: their callers' deadlines will tell)."""
        self._closing = True
        self._backlog.clear()
        for sub in self.subscriptions:
            try:
                await sub.unsubscribe()
            except Exception:  # connection already closed: nothing left to unsubscribe
                pass
        await self.tasks.wait(grace_s)
        await self.tasks.close()


async def dispatch(route: Route, data: bytes, ctx: Context) -> msgspec.Struct | bytes | ReplyTo | None:
    """Decode, call the handler, and turn every failure into a structured error reply."""
    try:
        request = route.decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return ErrorReply(
            error=Error(code="bad_request", message=f"malformed message on {ctx.subject}: {exc}")
        )
    try:
        return await route.handler(request, ctx)  # type: ignore[misc]  # not an inline route
    except Exception as exc:
        return _internal_error(request, ctx, exc)


def answer(nc: Connection, reply: msgspec.Struct | bytes | None, ctx: Context) -> None:
    """Send a handler's reply (encoded, or bytes as they are) to the requester, if it waits."""
    if reply is not None and ctx.reply:
        nc.publish_now(ctx.reply, reply if isinstance(reply, bytes) else encode(reply))


def internal_error(exc: Exception, invocation_id: str = "") -> ErrorReply:
    """What a caller hears when a handler (or what runs on its behalf) failed."""
    error = Error(code="internal", message=f"internal error: {type(exc).__name__}: {exc}")
    return ErrorReply(error=error, invocation_id=invocation_id)


def _internal_error(request: Any, ctx: Context, exc: Exception) -> ErrorReply:
    invocation_id = getattr(request, "invocation_id", "")
    log.error("handler for %s failed (invocation %s)", ctx.subject, invocation_id or "-", exc_info=exc)
    return internal_error(exc, invocation_id)


def _run_inline(route: Route, data: bytes, ctx: Context) -> None:
    try:
        request = route.decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("malformed message on %s: %s", ctx.subject, exc)
        return
    route.handler(request, ctx)


class Resend(msgspec.Struct, frozen=True):
    """Send a request again after `after_s` (then doubling) while no answer came; `message(n)`
    is the n-th copy (it may say that it is a copy), or None to send no more. (A Struct: a
    client makes one per request, and a frozen dataclass costs ~10x as much to make.)"""

    after_s: float
    message: Callable[[int], bytes | None]


class _Copies(msgspec.Struct):
    """How to send a request again: where, and the number and time of the next copy."""

    subject: str
    reply: str
    headers: dict[str, str] | None
    resend: Resend
    attempt: int  # the next copy's number (the first send is 1)
    after_s: float  # the wait before the next copy (doubles after each)
    at: float  # loop time of the next copy


# Called once with a request's outcome: the reply's body, or the exception that ended the wait.
Answer = Callable[[bytes | BaseException], None]


class _Waiting(msgspec.Struct):
    """One request waiting for its reply."""

    answer: Answer
    peer: str
    deadline: float  # loop time
    copies: _Copies | None = None
    slot: int = 0  # of its next timer (the next copy or the deadline) in the requester's Deadlines


class Requester:
    """Request-reply over one shared inbox, with one deadline per request (the next copy or the
    deadline, whichever is sooner; `fabric.deadlines`: at most 5 ms late, and no loop timer of
    its own) and peer-loss cancellation.

    Unlike `nc.request`, in-flight requests are grouped by peer, so when a peer is declared dead
    every request waiting on it fails at once with PeerLost and can be retried elsewhere.
    `request` awaits the answer; `send` hands it to a callback, for callers on the hot path that
    would otherwise hold a task (and its chain of coroutines) open only to wait.
    """

    def __init__(self, nc: Connection):
        self._nc = nc
        self._prefix = ""
        self._subscribed: asyncio.Future[None] | None = None
        self._ids = itertools.count()
        self._pending: dict[str, _Waiting] = {}
        self._by_peer: dict[str, set[str]] = defaultdict(set)
        self._deadlines = Deadlines(self._on_timer)  # type: ignore[arg-type]  # keys are tokens

    async def start(self) -> None:
        """Subscribe to the shared inbox (once, however many callers race to the first request)."""
        if self._subscribed is None:
            self._subscribed = asyncio.ensure_future(self._subscribe())
        await self._subscribed

    async def _subscribe(self) -> None:
        prefix = self._nc.new_inbox() + "."
        await self._nc.subscribe_inline(prefix + "*", self._on_reply)
        self._prefix = prefix

    def in_flight(self, peer: str) -> int:
        return len(self._by_peer.get(peer, ()))

    async def request(
        self,
        subject: str,
        data: bytes,
        timeout_s: float,
        headers: dict[str, str] | None,
        peer: str,
        resend: "Resend | None" = None,
    ) -> bytes:
        """The first reply's body. With `resend`, the request is sent again (with the same reply
        subject, so any copy's answer counts) while none has come: the peer may have died."""
        if timeout_s <= 0:
            raise RequestTimeout(f"no time left to ask {peer}")
        if not self._prefix:
            await self.start()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        token = self.send(subject, data, timeout_s, headers, peer, partial(_settle, future), resend)
        try:
            return await future
        finally:
            self._forget(token)  # cancelled while waiting: nothing is left behind

    def send(
        self,
        subject: str,
        data: bytes,
        timeout_s: float,
        headers: dict[str, str] | None,
        peer: str,
        answer: Answer,
        resend: "Resend | None" = None,
    ) -> str:
        """Send a request now and call `answer` once with its outcome, never before this returns
        (RequestTimeout, NoResponders and PeerLost as `request` raises them). Needs `start()`
        first; what publishing raises, it raises. Returns the request's token."""
        assert self._prefix, "Requester.send before start()"
        token = str(next(self._ids))
        loop = asyncio.get_running_loop()
        now = loop.time()
        waiting = _Waiting(answer, peer, now + timeout_s)
        reply = self._prefix + token
        if resend is not None:
            waiting.copies = _Copies(subject, reply, headers, resend, 2, resend.after_s, now + resend.after_s)
        self._nc.publish_now(subject, data, reply, headers)
        self._pending[token] = waiting
        self._by_peer[peer].add(token)
        self._arm(loop, token, waiting)
        return token

    def _arm(self, loop: asyncio.AbstractEventLoop, token: str, waiting: _Waiting) -> None:
        copies = waiting.copies
        at = copies.at if copies is not None and copies.at < waiting.deadline else waiting.deadline
        waiting.slot = self._deadlines.add(loop, at, token)

    def _on_timer(self, token: str) -> None:
        waiting = self._pending.get(token)
        if waiting is None:
            return
        loop = asyncio.get_running_loop()
        copies = waiting.copies
        if copies is None or loop.time() >= waiting.deadline:
            self._end(token, RequestTimeout(f"{waiting.peer} did not answer in time"))
            return
        copy = copies.resend.message(copies.attempt)
        if copy is None:
            waiting.copies = None  # no more copies: wait out the deadline
        else:
            try:
                self._nc.publish_now(copies.subject, copy, copies.reply, copies.headers)
            except nats.errors.Error as exc:  # not sent: the deadline still stands, or the next copy
                log.warning("copy %d to %s not sent: %s", copies.attempt, waiting.peer, exc)
            copies.attempt += 1
            copies.after_s *= 2
            copies.at = loop.time() + copies.after_s
        self._arm(loop, token, waiting)

    def fail_peer(self, peer: str) -> int:
        """Fail every request waiting on `peer`; returns how many there were."""
        tokens = list(self._by_peer.get(peer, ()))
        for token in tokens:
            self._end(token, PeerLost(f"{peer} was lost while handling the request"))
        return len(tokens)

    def _end(self, token: str, outcome: bytes | BaseException) -> None:
        """The request's first outcome goes to its caller; later ones find nothing."""
        waiting = self._forget(token)
        if waiting is None:
            return
        try:
            waiting.answer(outcome)
        except Exception:  # one caller's failure must not cost the others in the same batch
            log.exception("handling the answer of a request to %s failed", waiting.peer)

    def _forget(self, token: str) -> _Waiting | None:
        waiting = self._pending.pop(token, None)
        if waiting is None:
            return None
        self._deadlines.discard(waiting.slot, token)
        tokens = self._by_peer[waiting.peer]
        tokens.discard(token)
        if not tokens:
            del self._by_peer[waiting.peer]
        return waiting

    def _on_reply(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        token = subject[len(self._prefix) :]
        if token == subjects.BATCH_TOKEN:
            self._on_acks(subject, data)
        elif headers and headers.get(STATUS) == NO_RESPONDERS_STATUS:
            peer = waiting.peer if (waiting := self._pending.get(token)) else "the peer"
            self._end(token, NoResponders(f"{peer} has no subscriber"))
        else:
            self._end(token, data)  # a late reply, after a timeout or peer loss, finds nothing

    def _on_acks(self, subject: str, data: bytes) -> None:
        """Empty acknowledgements of several requests in one message (see `Server._batch_ack`)."""
        try:
            acks = codec.acks.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("malformed batched acknowledgements on %s: %s", subject, exc)
            return
        for token in acks.tokens:
            self._end(token, b"")


def _settle(future: "asyncio.Future[bytes]", outcome: bytes | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
