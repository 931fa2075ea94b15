"""The bus's fast path speaks NATS exactly as nats-py does: its parser against nats-py's on the same
bytes cut anywhere, its PUB/HPUB commands against nats-py's, its headers as nats-py reads them."""

import asyncio
from typing import Any

import nats.errors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.protocol import command, parser

from fabric.connection import Connection, MessageParser, encode_headers, parse_headers, publish_command

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=8)
SUBJECT = st.lists(TOKEN, min_size=1, max_size=4).map(".".join)
HEADER_VALUE = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-/=+ ", max_size=40)


class Recorder:
    """What a parser hands on: (sid, subject, reply, payload, headers) per message, and the
    other operations nats-py's parser calls."""

    def __init__(self, inline: bool) -> None:
        self.inline = inline
        self.seen: list[tuple[Any, ...]] = []

    def deliver_inline(self, *message: Any) -> bool:
        if self.inline:
            self.seen.append(message)
        return self.inline

    async def _process_msg(self, *message: Any) -> None:
        self.seen.append(message)

    async def _process_ping(self) -> None:
        self.seen.append(("PING",))

    async def _process_pong(self) -> None:
        self.seen.append(("PONG",))


def wire(messages: list[tuple[str, int, str, bytes, bytes | None]]) -> bytes:
    out = b""
    for subject, sid, reply, payload, headers in messages:
        reply_field = f" {reply}" if reply else ""
        if headers is None:
            out += f"MSG {subject} {sid}{reply_field} {len(payload)}\r\n".encode() + payload + b"\r\n"
        else:
            sizes = f"{len(headers)} {len(headers) + len(payload)}"
            out += f"HMSG {subject} {sid}{reply_field} {sizes}\r\n".encode() + headers + payload + b"\r\n"
        out += b"PING\r\n" if sid % 5 == 0 else b""
    return out


def parse_in_chunks(make_parser: Any, data: bytes, cuts: list[int], inline: bool) -> list[tuple[Any, ...]]:
    recorder = Recorder(inline)
    p = make_parser(recorder)

    async def feed() -> None:
        start = 0
        for cut in [*sorted(set(cuts)), len(data)]:
            await p.parse(data[start:cut])
            start = cut

    asyncio.run(feed())
    return recorder.seen


MESSAGES = st.lists(
    st.tuples(
        SUBJECT,
        st.integers(1, 99),
        st.one_of(st.just(""), SUBJECT),
        st.binary(max_size=64),
        st.one_of(st.none(), HEADER_VALUE.map(lambda v: f"NATS/1.0\r\ntraceparent: {v}\r\n\r\n".encode())),
    ),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(MESSAGES, st.lists(st.integers(0, 2000), max_size=8), st.booleans())
def test_the_parser_reads_what_nats_py_reads_however_the_bytes_are_cut(
    messages: list[tuple[str, int, str, bytes, bytes | None]], cuts: list[int], inline: bool
) -> None:
    data = wire(messages)
    cuts = [c for c in cuts if c < len(data)]
    ours = parse_in_chunks(MessageParser, data, cuts, inline)
    theirs = parse_in_chunks(parser.Parser, data, cuts, inline=False)
    assert ours == theirs
    assert len([m for m in ours if m[0] != "PING"]) == len(messages)


@pytest.mark.parametrize(
    "line",
    [b"MSG a\r\n", b"MSG a 1 2 3 4\r\n", b"MSG a x 3\r\n", b"HMSG a 1 nine 9\r\n"],
)
def test_a_malformed_message_line_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(nats.errors.ProtocolError):
        asyncio.run(MessageParser(Recorder(True)).parse(line + b"xyz\r\n"))


@given(SUBJECT, st.one_of(st.just(""), SUBJECT), st.binary(max_size=100))
def test_a_publish_is_the_command_nats_py_writes(subject: str, reply: str, payload: bytes) -> None:
    assert publish_command(subject, reply, payload, None) == command.pub_cmd(subject, reply, payload)


def test_a_publish_with_headers_is_framed_as_nats_py_frames_it() -> None:
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "x": "y"}
    block = (
        b"NATS/1.0\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nx: y\r\n\r\n"
    )
    assert encode_headers(headers) == block
    assert publish_command("s", "r", b"body", headers) == command.hpub_cmd("s", "r", block, b"body")


@pytest.mark.parametrize("key", ["", "two words", "colon:", "line\r\nbreak"])
def test_a_header_name_that_would_break_the_framing_is_refused(key: str) -> None:
    with pytest.raises(nats.errors.BadHeaderError):
        encode_headers({key: "v"})


def test_a_line_break_in_a_header_value_cannot_end_the_block() -> None:
    assert encode_headers({"k": "a\r\nPUB evil 1"}) == b"NATS/1.0\r\nk: a  PUB evil 1\r\n\r\n"


@given(st.dictionaries(TOKEN, HEADER_VALUE.map(str.strip), max_size=4))
def test_headers_read_back_as_written(headers: dict[str, str]) -> None:
    assert parse_headers(encode_headers(headers)) == (headers or None)


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (b"NATS/1.0 503\r\n\r\n", {"Status": "503"}),
        (b"NATS/1.0 404 No Messages\r\n\r\n", {"Status": "404", "Description": "No Messages"}),
        (b"NATS/1.0\r\na: 1\r\na: 2\r\n\r\n", {"a": "2"}),
        (b"NATS/1.0\r\n\r\n", None),
    ],
)
def test_an_inline_status_and_repeated_keys_read_as_nats_py_reads_them(
    block: bytes, expected: dict[str, str] | None
) -> None:
    assert parse_headers(block) == expected


@pytest.mark.parametrize(
    ("subject", "reply"),
    [("a b", ""), ("a\tb", ""), ("a\r\nPUB x 1", ""), ("ok", "in box"), ("ok", "in\nbox"), ("", "")],
)
def test_a_subject_that_would_split_the_command_line_is_refused(subject: str, reply: str) -> None:
    """A space, tab or line break in a subject would let a caller inject NATS commands."""
    with pytest.raises(nats.errors.BadSubjectError):
        Connection().publish_now(subject, b"x", reply)
