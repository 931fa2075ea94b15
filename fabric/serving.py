"""Serving a typed handler table: one place decodes requests, runs fast paths as messages are
read, bounds concurrency, opens a route's span around its handler and maps handler exceptions to
`internal` error replies; services only write `async def on_x(req, ctx) -> Reply`."""

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors

from fabric import telemetry
from fabric.connection import Connection, Deliver
from fabric.tasks import TaskSet
from fabric.tracing import NoSpan, Span
from schemas import subjects
from schemas.codec import encode
from schemas.messages import Acks, ErrorReply, error_reply

log = logging.getLogger(__name__)

MAX_ACKS_PER_MESSAGE = 4096  # a batch of acknowledgements stays far under NATS's max_payload


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
    # The answer keeps the invocation's trace (fabric/sampling.py): the acknowledgement says so
    # (TRACE_KEPT, alone), so that the requester's deferred spans are kept too.
    keep_trace: bool = False


# An acknowledgement's body when the answer kept the trace: 0xc1 is never used by msgpack, so
# no reply (and no empty acknowledgement) can look like it.
TRACE_KEPT = b"\xc1"


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


def mark_failed(span: Span | NoSpan, reply: Any) -> None:
    """A route span's default ending: failed when the handler answered with an error."""
    telemetry.noted(span, reply)


@dataclass(frozen=True)
class Traced:
    """A route's span, opened by `dispatch` around its handler under the caller's trace (its
    `traceparent` header): the name, its attributes from the request, and what the reply adds
    (`ended(span, reply)`)."""

    name: str
    attributes: Callable[[Any], dict[str, Any]]
    ended: Callable[[Any, Any], None] = mark_failed
    deferrable: bool = False  # an invocation's: its trace may be decided at its end


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
    # The handler's path runs in this span (a fast path opens its own, only when it takes one).
    span: Traced | None = None
    # A tenant's request (the subject's third token names the tenant, and NATS let only that
    # tenant or the operator publish it): taken only when its reply subject is that tenant's own
    # inbox, so nobody can have an answer sent to another tenant's inbox (docs §8).
    tenant_reply: bool = False
    # The reply subject is in this header, not the message's reply (a hand-over between replicas
    # passing on a reply the server made for a tenant's request: see subjects.HAND_OVER_REPLY).
    reply_header: str = ""


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
        self.foreign_replies = 0  # tenant requests dropped for a reply subject not the tenant's
        self._running = 0
        self._backlog: deque[tuple[Route, bytes, Context]] = deque()
        self._closing = False
        # batched-replies subject -> the reply tokens acknowledged, sent once per loop iteration
        self._acks: dict[str, list[str]] = {}

    async def serve(self, routes: list[Route]) -> list[Any]:
        """Subscribe `routes`; returns their subscriptions (for `stop_serving`)."""
        subscribed = []
        for route in routes:
            sub = await self.nc.subscribe_inline(route.subject, self._deliverer(route), route.queue)
            subscribed.append(sub)
        self.subscriptions.extend(subscribed)
        await self.nc.flush(timeout=5)
        return subscribed

    async def stop_serving(self, subscriptions: list[Any]) -> None:
        """Unsubscribe these (what they already took still runs and is answered)."""
        for sub in subscriptions:
            if sub in self.subscriptions:
                self.subscriptions.remove(sub)
            try:
                await sub.unsubscribe()
            except Exception:  # the connection is gone: nothing left to unsubscribe
                pass
        with contextlib.suppress(Exception):  # as above
            await self.nc.flush(timeout=5)

    def _deliverer(self, route: Route) -> Deliver:
        def deliver(subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
            if route.reply_header:
                reply = (headers or {}).get(route.reply_header, reply)
            if route.tenant_reply and not subjects.reply_is_the_tenants(subject, reply):
                self._foreign_reply(subject, reply)
                return
            ctx = Context(subject=subject, headers=headers, received_at=time.monotonic(), reply=reply)
            if route.inline:
                _run_inline(route, data, ctx)
            elif self._running < self.max_concurrent:
                if route.fast is None or not self._took_fast(route, data, ctx):
                    self._start(route, data, ctx)
            else:
                self._wait_for_a_slot(route, data, ctx)

        return deliver

    def _foreign_reply(self, subject: str, reply: str) -> None:
        """Nothing is sent to a reply subject that is not the requesting tenant's: it would be
        an answer delivered to (or forged into) someone else's inbox. Logged once in 1000."""
        if self.foreign_replies % 1000 == 0:
            log.warning(
                "dropped a request on %s: its reply subject %r is not the tenant's inbox", subject, reply
            )
        self.foreign_replies += 1

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
            self.nc.publish_now(ctx.reply, encode(error_reply("throttled", why)))

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
            if reply.keep_trace:
                reply = TRACE_KEPT
            elif reply.batch_ack and ctx.reply and self._batch_ack(ctx.reply):
                return
            else:
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
        return error_reply("bad_request", f"malformed message on {ctx.subject}: {exc}")
    handler: Handler = route.handler  # type: ignore[assignment]  # not an inline route
    try:
        if route.span is None or not telemetry.enabled():
            return await handler(request, ctx)
        return await traced_call(route.span, handler, request, ctx)
    except Exception as exc:
        return _internal_error(request, ctx, exc)


async def traced_call(
    traced: Traced, handler: Handler, request: Any, ctx: Context
) -> msgspec.Struct | bytes | ReplyTo | None:
    """The handler's call in the route's span (what dispatch does when tracing is on)."""
    attributes = traced.attributes(request)
    kind = telemetry.SpanKind.SERVER
    with telemetry.span(
        traced.name, parent=ctx.headers, kind=kind, attributes=attributes, deferrable=traced.deferrable
    ) as span:
        reply = await handler(request, ctx)
        traced.ended(span, reply)
        return reply


def answer(nc: Connection, reply: msgspec.Struct | bytes | None, ctx: Context) -> None:
    """Send a handler's reply (encoded, or bytes as they are) to the requester, if it waits."""
    if reply is not None and ctx.reply:
        nc.publish_now(ctx.reply, reply if isinstance(reply, bytes) else encode(reply))


def internal_error(exc: Exception, invocation_id: str = "") -> ErrorReply:
    """What a caller hears when a handler (or what runs on its behalf) failed."""
    return error_reply("internal", f"internal error: {type(exc).__name__}: {exc}", invocation_id)


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
