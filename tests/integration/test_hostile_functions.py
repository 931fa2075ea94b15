"""A python function attacking its node through the worker's socket (its handler runs in the
worker's process and can write raw frames): a frame past the output cap, a header that lies
about its size, an answer nobody asked for, spans past their bounds. Each fails only that call,
with a clear error; the node's memory stays put; the next call, of that function or another,
gets its own answer."""

from pathlib import Path

import pytest

from cli.client import Client
from deploy import launcher
from tests.integration.conftest import HOST_OVERRIDES, make_function, rss_mb

pytestmark = pytest.mark.integration

HOSTILE = """
import os, struct

OUTPUT = 4
SPANS = 14


def send(data):
    while data:
        data = data[os.write(3, data):]  # fd 3: the worker's socket to its node


def handle(payload):
    action, _, arg = payload.decode().partition(" ")
    if action == "oversized":  # one OUTPUT frame past the node's output cap
        body = b"x" * int(arg)
        send(struct.pack("!IB", len(body), OUTPUT) + body)
        return "sent"
    if action == "liar":  # a header claiming 4 GB, then bytes until the node hangs up
        send(struct.pack("!IB", 0xFFFFFFFF, OUTPUT))
        chunk = b"y" * (1 << 20)
        for _ in range(int(arg)):
            send(chunk)
        return "sent"
    if action == "spans":  # SPANS frames of its own making: N of them, each of SIZE bytes
        count, size = (int(x) for x in arg.split())
        for _ in range(count):
            send(struct.pack("!IB", size, SPANS) + b"[" + b" " * (size - 2) + b"]")
        return "after spans"
    if action == "extra":  # an answer of its own, then the worker's: one frame too many
        send(struct.pack("!IB", 6, OUTPUT) + b"forged")
        return arg
    return "own:" + action
"""
MIB = 1 << 20


@pytest.fixture
async def hostile(client: Client, tmp_path: Path, tenant: str) -> str:
    manifest = 'runtime = "python"\nhandler = "main:handle"\nmemory_mb = 512\ntimeout_ms = 20000\n'
    await client.deploy(make_function(tmp_path, "hostile", manifest, {"main.py": HOSTILE}), tenant=tenant)
    await client.deploy(make_function(tmp_path, "plain", manifest, {"main.py": HOSTILE}), tenant=tenant)
    return tenant


async def test_a_frame_past_the_output_cap_fails_only_that_call(client: Client, hostile: str) -> None:
    cap = HOST_OVERRIDES["max_output_bytes"]
    outcome = await client.invoke(hostile, "hostile", f"oversized {2 * cap}".encode())
    assert outcome.error is not None and outcome.error.code == "function_error", outcome
    assert f"a frame of {2 * cap} bytes, over the {cap}" in outcome.error.message
    again = await client.invoke(hostile, "hostile", b"next")
    other = await client.invoke(hostile, "plain", b"other")
    assert again.ok and again.reply.output == b"own:next", again.error
    assert other.ok and other.reply.output == b"own:other", other.error


async def test_a_header_that_lies_costs_the_node_no_memory(
    cluster: launcher.ClusterInfo, client: Client, hostile: str
) -> None:
    before = {name: rss_mb(pid) for name, pid in cluster.processes.items() if name.startswith("host-")}
    outcome = await client.invoke(hostile, "hostile", b"liar 300")  # 300 MiB after a 4 GB header
    assert outcome.error is not None and outcome.error.code == "function_error", outcome
    assert "broke the node's protocol" in outcome.error.message
    grown = {name: rss_mb(cluster.processes[name]) - mb for name, mb in before.items()}
    assert max(grown.values()) < 64, f"node memory grew {grown} MB"
    again = await client.invoke(hostile, "hostile", b"next")
    assert again.ok and again.reply.output == b"own:next", again.error


async def test_an_answer_nobody_asked_for_is_never_another_calls(client: Client, hostile: str) -> None:
    """The forged frame lacks the call's number (protocol.SEQ): the call fails, the instance is
    stopped. Before the numbers, the forged frame answered the call, and the worker's own answer,
    when it came late (seen with stem cells: 2 runs in 4), answered the next call."""
    first = await client.invoke(hostile, "hostile", b"extra first")
    assert first.error is not None and first.error.code == "function_error", first
    assert "an answer to another call" in first.error.message, first.error
    for i in range(3):  # the worker's own answer to the first call never reaches a later one
        later = await client.invoke(hostile, "hostile", f"later{i}".encode())
        assert later.ok and later.reply.output == f"own:later{i}".encode(), later


@pytest.mark.parametrize(
    ("spans", "refused"),
    [
        ("2 16", "a second SPANS frame for one invocation"),
        ("1 100000", "a frame of 100000 bytes, over the 65536"),
    ],
)
async def test_spans_past_their_bounds_fail_only_that_call(
    client: Client, hostile: str, spans: str, refused: str
) -> None:
    """A handler's spans come in one frame of at most 64 KiB per call; past that, the node cuts
    the instance off as for any frame it never takes."""
    outcome = await client.invoke(hostile, "hostile", f"spans {spans}".encode())
    assert outcome.error is not None and outcome.error.code == "function_error", outcome
    assert refused in outcome.error.message, outcome.error
    again = await client.invoke(hostile, "hostile", b"next")
    assert again.ok and again.reply.output == b"own:next", again.error


async def test_spans_that_are_not_spans_are_dropped_and_the_call_answered(
    client: Client, hostile: str
) -> None:
    outcome = await client.invoke(hostile, "hostile", b"spans 1 64")  # "[" blanks "]": no span in it
    assert outcome.ok and outcome.reply.output == b"after spans", outcome.error
