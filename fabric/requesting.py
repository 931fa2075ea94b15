"""Requests with explicit deadlines over one shared inbox: resent copies, callbacks instead of
tasks on the hot path, and every request waiting on a peer failed at once when it is lost."""

import asyncio
import itertools
import logging
import secrets
from collections import defaultdict
from collections.abc import Callable
from functools import partial

import msgspec
import nats.errors

from fabric.connection import STATUS, Connection
from fabric.deadlines import Deadlines
from schemas import codec, subjects

log = logging.getLogger(__name__)

NO_RESPONDERS_STATUS = "503"


class RequestTimeout(asyncio.TimeoutError):
    """No reply before the request's deadline."""


class NoResponders(ConnectionError):
    """Nobody subscribes to the subject: the peer is gone (NATS answers at once with status 503).
    Raised only when nothing was sent before: a request sent again (after a reconnect, or as
    a copy) that finds nobody listening may have reached the peer the first time."""


class PeerLost(ConnectionError):
    """The peer was declared dead while the request was in flight."""


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


# What a waiting request's timer is for.
DEADLINE, COPY, RETRY = "deadline", "copy", "retry"
# Asking again a peer that was not listening after a reconnect: it is most likely reconnecting
# too (a host's link came back 0.4-1.5 s after its NATS server's kill -9), so soon and often.
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0


class _Waiting(msgspec.Struct):
    """One request waiting for its reply."""

    answer: Answer
    peer: str
    deadline: float  # loop time
    copies: _Copies | None = None
    slot: int = 0  # of its next timer (the next copy or the deadline) in the requester's Deadlines
    # An idempotent request (its peer runs a copy once: fabric.nodes.Once): sent again as it
    # was after a reconnect, since its reply may have come while the link was down
    again: tuple[str, bytes, str, dict[str, str] | None] | None = None
    sent: int = 1  # times published: past the first, "no responders" no longer says "never had it"
    due: str = DEADLINE  # what its timer is for: DEADLINE, COPY (the next copy) or RETRY
    retry_at: float = 0.0  # loop time to ask again a peer that was not listening (0: not due)
    retry_after_s: float = 0.0  # the last pause before asking again (doubles)


class Requester:
    """Request-reply over one shared inbox, with one deadline per request (the next copy or the
    deadline, whichever is sooner; `fabric.deadlines`: at most 5 ms late, and no loop timer of
    its own) and peer-loss cancellation.

    Unlike `nc.request`, in-flight requests are grouped by peer, so when a peer is declared dead
    every request waiting on it fails at once with PeerLost and can be retried elsewhere.
    `request` awaits the answer; `send` hands it to a callback, for callers on the hot path that
    would otherwise hold a task (and its chain of coroutines) open only to wait.
    """

    def __init__(self, nc: Connection, inbox_under: str = ""):
        """Replies come to `<inbox_under>.<random>.<token>` (a tenant's requests: under the
        tenant's inbox, where the services answering them check the reply goes), or under the
        connection's own inbox prefix."""
        self._nc = nc
        self._inbox_under = inbox_under
        self._prefix = ""
        self._subscribed: asyncio.Future[None] | None = None
        self._ids = itertools.count()
        self._pending: dict[str, _Waiting] = {}
        self._by_peer: dict[str, set[str]] = defaultdict(set)
        self._deadlines = Deadlines(self._on_timer)  # type: ignore[arg-type]  # keys are tokens
        # Requests sent again that found nobody listening, and were asked again rather than
        # failed: the first copy may have reached the peer (measured: a host node still
        # reconnecting after its NATS server's kill -9; tried elsewhere, 4 of 35 877 calls ran twice)
        self.asked_again = 0
        nc.on_reconnected.append(self.send_again)

    async def start(self) -> None:
        """Subscribe to the shared inbox (once, however many callers race to the first request)."""
        if self._subscribed is None:
            self._subscribed = asyncio.ensure_future(self._subscribe())
        await self._subscribed

    async def _subscribe(self) -> None:
        if self._inbox_under:
            prefix = f"{self._inbox_under}.{secrets.token_hex(11)}."
        else:
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
        idempotent: bool = False,
    ) -> bytes:
        """The first reply's body. With `resend`, the request is sent again (with the same reply
        subject, so any copy's answer counts) while none has come: the peer may have died."""
        if timeout_s <= 0:
            raise RequestTimeout(f"no time left to ask {peer}")
        if not self._prefix:
            await self.start()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        token = self.send(
            subject, data, timeout_s, headers, peer, partial(_settle, future), resend, idempotent
        )
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
        idempotent: bool = False,
    ) -> str:
        """Send a request now and call `answer` once with its outcome, never before this returns
        (RequestTimeout, NoResponders and PeerLost as `request` raises them). Needs `start()`
        first; what publishing raises, it raises. Returns the request's token. An `idempotent`
        request, and one with `resend`, is sent again at once after a reconnect."""
        assert self._prefix, "Requester.send before start()"
        token = str(next(self._ids))
        loop = asyncio.get_running_loop()
        now = loop.time()
        waiting = _Waiting(answer, peer, now + timeout_s)
        reply = self._prefix + token
        if resend is not None:
            waiting.copies = _Copies(subject, reply, headers, resend, 2, resend.after_s, now + resend.after_s)
        elif idempotent:
            waiting.again = (subject, data, reply, headers)
        self._nc.publish_now(subject, data, reply, headers)
        self._pending[token] = waiting
        self._by_peer[peer].add(token)
        self._arm(loop, token, waiting)
        return token

    def _arm(self, loop: asyncio.AbstractEventLoop, token: str, waiting: _Waiting) -> None:
        """Its timer at the soonest of the deadline, the next copy and the next retry."""
        at, waiting.due = waiting.deadline, DEADLINE
        copies = waiting.copies
        if copies is not None and copies.at < at:
            at, waiting.due = copies.at, COPY
        if waiting.retry_at and waiting.retry_at < at:
            at, waiting.due = waiting.retry_at, RETRY
        waiting.slot = self._deadlines.add(loop, at, token)

    def _on_timer(self, token: str) -> None:
        waiting = self._pending.get(token)
        if waiting is None:
            return
        loop = asyncio.get_running_loop()
        if waiting.due == DEADLINE:
            self._end(token, RequestTimeout(f"{waiting.peer} did not answer in time"))
            return
        if waiting.due == RETRY:
            waiting.retry_at = 0.0  # due again only after another "no responders"
            self._publish_again(waiting)
        elif (copies := waiting.copies) is not None:
            if self._publish_again(waiting) is None:
                waiting.copies = None  # no more copies: wait out the deadline
            else:
                copies.after_s *= 2
                copies.at = loop.time() + copies.after_s
        self._arm(loop, token, waiting)

    def _publish_again(self, waiting: _Waiting) -> bool | None:
        """Send the request once more: as it was (idempotent), or its next copy. False: not
        sent (the link is down; its timer still stands); None: it has no more copies."""
        try:
            if waiting.again is not None:
                self._nc.publish_now(*waiting.again)
            elif (copies := waiting.copies) is not None:
                copy = copies.resend.message(copies.attempt)
                if copy is None:
                    return None
                copies.attempt += 1
                self._nc.publish_now(copies.subject, copy, copies.reply, copies.headers)
            else:
                return None
        except nats.errors.Error as exc:
            log.warning("request to %s not sent again: %s", waiting.peer, exc)
            return False
        waiting.sent += 1
        return True

    def send_again(self) -> None:
        """After a reconnect: a reply sent while the link was down is lost (core NATS holds
        nothing for a client that is away), so every request that may be sent again is, at
        once, rather than when its timer comes (measured: a kill -9 of the NATS server a
        scheduler used made calls it had forwarded wait out their 8 s deadline)."""
        for waiting in list(self._pending.values()):
            self._publish_again(waiting)

    def _not_listening_yet(self, token: str, waiting: _Waiting) -> None:
        """A request sent more than once found nobody listening: the peer may have had an
        earlier copy and be reconnecting itself, so failing it as NoResponders (which callers
        try elsewhere) could run it twice. It is asked again, sooner at first, until it
        answers, the deadline passes or the peer is declared lost (`fail_peer`)."""
        if waiting.retry_at:
            return  # due already (several copies' refusals)
        self.asked_again += 1
        loop = asyncio.get_running_loop()
        waiting.retry_after_s = min(max(RETRY_FIRST_S, 2 * waiting.retry_after_s), RETRY_MAX_S)
        waiting.retry_at = loop.time() + waiting.retry_after_s
        self._deadlines.discard(waiting.slot, token)
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
            waiting = self._pending.get(token)
            if waiting is not None and waiting.sent > 1:
                self._not_listening_yet(token, waiting)
            else:
                peer = waiting.peer if waiting else "the peer"
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
