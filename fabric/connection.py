"""nats-py's client with a fast path for the platform's hot subjects.

nats-py hands every message of a callback subscription to a queue and a task of its own, parses
control lines with regular expressions and headers line by line, and publishes through three
coroutines and a new Future. `bench/bus_path.py`: a responder running a task per request, as a
service does, spent 18-24 µs of CPU per request through nats-py and 13-16 µs here; answering
inline, 10-20 µs against 9-14 µs (the widest gaps with a `traceparent` header). So:

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
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.protocol import parser

log = logging.getLogger(__name__)

# subject, reply subject ("" for none), body, headers (None for none)
Deliver = Callable[[str, str, bytes, dict[str, str] | None], None]

STATUS = "Status"  # the header nats-py gives an inline status (503: no responders)
DESCRIPTION = "Description"
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


def _splits_a_line(text: str) -> bool:
    """Whitespace in a subject or header key would split a PUB line: a protocol injection.
    (`in` four times: a third of a regular expression's time, and every publish checks two.)"""
    return " " in text or "\t" in text or "\r" in text or "\n" in text


class Connection(NATS):
    def __init__(self) -> None:
        super().__init__()
        self._ps = MessageParser(self)
        self._inline: dict[int, Deliver] = {}
        self._kick: asyncio.Future[None] | None = None  # a finished future: wakes the flusher
        # Called after each reconnect (fabric.bus wires nats-py's callback to them): what was
        # published while the link was down may be lost, and replies sent to us then are.
        self.on_reconnected: list[Callable[[], None]] = []

    async def subscribe_inline(self, subject: str, deliver: Deliver, queue: str = "") -> Subscription:
        """Subscribe with `deliver` called for each message as it arrives. It must not block;
        what it raises is logged and costs only that message."""
        sub = await self.subscribe(subject, queue=queue)  # no callback: nats-py starts no task
        self._inline[sub._id] = deliver
        return sub

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        if not self.deliver_inline(sid, subject, reply, data, headers):
            await super()._process_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]

    def deliver_inline(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> bool:
        """Hand a message to its inline subscriber; False when it has none."""
        deliver = self._inline.get(sid)
        if deliver is None:
            return False
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        try:
            parsed = parse_headers(headers) if headers else None
            deliver(subject.decode(), reply.decode(), data, parsed)
        except Exception:  # one bad message must not break the connection's read loop
            log.exception("message on %r not handled", subject)
        return True

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        super()._remove_sub(sid, max_msgs)
        self._inline.pop(sid, None)

    def publish_now(
        self, subject: str, payload: bytes, reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        """`publish` without awaiting: the same checks and errors, the same buffering while
        reconnecting, the same flusher."""
        if not subject or _splits_a_line(subject) or (reply and _splits_a_line(reply)):
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
    block = "NATS/1.0\r\n"
    for key, value in headers.items():
        if not key or _splits_a_line(key) or ":" in key:
            raise nats.errors.BadHeaderError(key)
        if "\r" in value or "\n" in value:  # a line break would end the header early
            value = value.translate(_NEWLINES)
        block += f"{key}: {value.strip()}\r\n"
    return (block + "\r\n").encode()


def parse_headers(block: bytes) -> dict[str, str] | None:
    """`NATS/1.0[ status[ description]]\\r\\nKey: value\\r\\n...\\r\\n\\r\\n` as nats-py reads it:
    the inline status under `Status` (and `Description`), the last value of a repeated key."""
    lines = block.decode(errors="replace").split("\r\n")  # decoded once: str methods are quicker
    headers: dict[str, str] = {}
    status = lines[0][9:].strip()  # after "NATS/1.0 "
    if status:
        code, _, description = status.partition(" ")
        if code.isdigit():
            headers[STATUS] = code
        if description.strip():
            headers[DESCRIPTION] = description.strip()
    for line in lines[1:]:
        key, colon, value = line.partition(":")
        key = key.strip()
        if colon and key:
            headers[key] = value.strip()
    return headers or None


class MessageParser(parser.Parser):
    """nats-py's parser with MSG and HMSG read without regular expressions, and messages for an
    inline subscription delivered without a coroutine; other operations (PING, INFO, -ERR...)
    are left to nats-py's own parser."""

    nc: Connection

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        buf.extend(data)
        nc = self.nc
        while buf:
            if self.state == parser.AWAITING_CONTROL_LINE:
                if not (buf.startswith(b"MSG ") or buf.startswith(b"HMSG ")):
                    await super().parse()  # whatever else the server sent, then what follows it
                    return
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > parser.MAX_CONTROL_LINE_SIZE:
                        raise nats.errors.ProtocolError("nats: control line too long")
                    return  # the rest of the line is still on its way
                self._read_control_line(bytes(buf[:end]))
                del buf[: end + 2]
                self.state = parser.AWAITING_MSG_PAYLOAD
            needed, header_needed = self.needed, self.header_needed
            if len(buf) < needed + 2:
                return  # the rest of the payload is still on its way
            arg = self.msg_arg
            headers = bytes(buf[:header_needed]) if header_needed else None
            payload = bytes(buf[header_needed:needed])
            del buf[: needed + 2]
            self.state = parser.AWAITING_CONTROL_LINE
            self.header_needed = 0
            sid, subject, reply = arg["sid"], arg["subject"], arg["reply"]
            if not nc.deliver_inline(sid, subject, reply, payload, headers):
                await nc._process_msg(sid, subject, reply, payload, headers)

    def _read_control_line(self, line: bytes) -> None:
        """`MSG subject sid [reply] size` or `HMSG subject sid [reply] header-size size`."""
        fields = line.split()
        headers = fields[0] == b"HMSG"
        count = len(fields) - headers
        if count not in (4, 5):
            raise nats.errors.ProtocolError("nats: malformed MSG")
        try:
            self.msg_arg["subject"] = fields[1]
            self.msg_arg["sid"] = int(fields[2])
            self.msg_arg["reply"] = fields[3] if count == 5 else b""
            self.needed = int(fields[-1])
            self.header_needed = int(fields[-2]) if headers else 0
        except ValueError:
            raise nats.errors.ProtocolError("nats: malformed MSG") from None
