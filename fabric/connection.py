"""nats-py's client with a fast path for the platform's hot subjects.

nats-py hands every message of a callback subscription to a queue and a task of its own, parses
headers in Python line by line, and publishes through three coroutines and a new Future. On the
warm path that was most of a service's own cost per message (`bench/bus_path.py`: a responder
spends 18-28 µs of CPU per request through nats-py's callback and a task, 7-11 µs here). So:

- `subscribe_inline` hands each message to a plain function, in the read loop, as it is parsed;
- headers are parsed only as NATS frames them (`Key: value` lines, an inline status);
- `publish_now` appends the PUB command and wakes nats-py's own flusher, with no coroutine.

Everything else (connecting, reconnecting and resubscribing, JetStream, ordinary subscriptions)
is nats-py's. This leans on its internals (`_process_msg`, `_remove_sub`, `_pending`,
`_flush_queue`, `_max_payload`), which is why nats-py is pinned to one version;
tests/integration/test_bus.py runs all of it against a real nats-server.
"""

import asyncio
import logging
import re
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

# subject, reply subject ("" for none), body, headers (None for none)
Deliver = Callable[[str, str, bytes, dict[str, str] | None], None]

STATUS = "Status"  # the header nats-py gives an inline status (503: no responders)
DESCRIPTION = "Description"
_WHITESPACE = re.compile(r"[ \t\r\n]")  # would split a PUB line: a protocol injection
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


class Connection(NATS):
    def __init__(self) -> None:
        super().__init__()
        self._inline: dict[int, Deliver] = {}
        self._kick: asyncio.Future[None] | None = None  # a finished future: wakes the flusher

    async def subscribe_inline(self, subject: str, deliver: Deliver, queue: str = "") -> Subscription:
        """Subscribe with `deliver` called for each message as it arrives. It must not block;
        what it raises is logged and costs only that message."""
        sub = await self.subscribe(subject, queue=queue)  # no callback: nats-py starts no task
        self._inline[sub._id] = deliver
        return sub

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        deliver = self._inline.get(sid)
        if deliver is None:
            await super()._process_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]
            return
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        try:
            parsed = parse_headers(headers) if headers else None
            deliver(subject.decode(), reply.decode(), data, parsed)
        except Exception:  # one bad message must not break the connection's read loop
            log.exception("message on %r not handled", subject)

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        super()._remove_sub(sid, max_msgs)
        self._inline.pop(sid, None)

    def publish_now(
        self, subject: str, payload: bytes, reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        """`publish` without awaiting: the same checks and errors, the same buffering while
        reconnecting, the same flusher."""
        if not subject or _WHITESPACE.search(subject) or (reply and _WHITESPACE.search(reply)):
            raise nats.errors.BadSubjectError
        if self.is_closed:
            raise nats.errors.ConnectionClosedError
        if self.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        size = len(payload)
        if size > self._max_payload:
            raise nats.errors.MaxPayloadError
        connected = self.is_connected
        if not connected and (
            self._max_pending_size <= 0 or size + self._pending_data_size > self._max_pending_size
        ):
            raise nats.errors.OutboundBufferLimitError
        command = publish_command(subject, reply, payload, headers)
        self._pending.append(command)
        self._pending_data_size += len(command)
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += size
        if connected and self._flush_queue is not None and self._flush_queue.empty():
            self._flush_queue.put_nowait(self._finished_future())

    def _finished_future(self) -> "asyncio.Future[None]":
        # The flusher writes what is pending, then resolves the future it was woken with unless
        # it is done already: one finished future serves every wake-up.
        if self._kick is None:
            self._kick = asyncio.get_running_loop().create_future()
            self._kick.set_result(None)
        return self._kick


def publish_command(subject: str, reply: str, payload: bytes, headers: dict[str, str] | None) -> bytes:
    """The PUB (or HPUB) command as nats-py writes it."""
    if not headers:
        return b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), len(payload), payload)
    block = encode_headers(headers)
    size = len(block)
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
        subject.encode(),
        reply.encode(),
        size,
        size + len(payload),
        block,
        payload,
    )


def encode_headers(headers: dict[str, str]) -> bytes:
    lines = [b"NATS/1.0"]
    for key, value in headers.items():
        key = key.strip()
        if not key or _WHITESPACE.search(key) or ":" in key:
            raise nats.errors.BadHeaderError(key)
        lines.append(f"{key}: {value.strip().translate(_NEWLINES)}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n"


def parse_headers(block: bytes) -> dict[str, str] | None:
    """`NATS/1.0[ status[ description]]\\r\\nKey: value\\r\\n...\\r\\n\\r\\n` as nats-py reads it:
    the inline status under `Status` (and `Description`), the last value of a repeated key."""
    first, _, rest = block.partition(b"\r\n")
    headers: dict[str, str] = {}
    status = first[9:].strip()  # after "NATS/1.0 "
    if status:
        code, _, description = status.partition(b" ")
        if code.isdigit():
            headers[STATUS] = code.decode()
        if description.strip():
            headers[DESCRIPTION] = description.strip().decode(errors="replace")
    for line in rest.split(b"\r\n"):
        key, colon, value = line.partition(b":")
        key = key.strip()
        if colon and key:
            headers[key.decode(errors="replace")] = value.strip().decode(errors="replace")
    return headers or None
