"""A function's output, read back from the nodes that ran it (`hetfaas logs`)."""

import asyncio
from collections import Counter

import pytest

from cli.client import Client, ClientError
from tests.integration.conftest import make_function

pytestmark = pytest.mark.integration

# One instance per node: calls at once spread over the nodes.
MANIFEST = 'runtime = "python"\nhandler = "main:handle"\nconcurrency = 1\n'
TALKER = """
import sys, time

def handle(payload):
    print("out", payload.decode(), flush=True)
    print("err", payload.decode(), file=sys.stderr, flush=True)
    time.sleep(0.2)
    return payload
"""


async def test_logs_gather_each_node_s_output_of_the_function(client: Client, tenant: str, tmp_path) -> None:
    await client.deploy(make_function(tmp_path, "talker", MANIFEST, {"main.py": TALKER}), tenant=tenant)
    outcomes = await asyncio.gather(*(client.invoke(tenant, "talker", f"n{i}".encode()) for i in range(4)))
    reply = await client.logs(tenant, "talker")

    assert [o.error for o in outcomes if not o.ok] == []
    assert {logs.node for logs in reply.logs} == {o.node for o in outcomes}
    for logs in reply.logs:
        ran_here = sorted(o.reply.output.decode() for o in outcomes if o.node == logs.node)
        assert sorted(logs.lines) == sorted(f"{kind} {n}" for n in ran_here for kind in ("out", "err"))
        assert not logs.truncated


async def test_the_tail_is_the_last_lines_and_outlives_the_function(
    client: Client, tenant: str, tmp_path
) -> None:
    """Each node's tail is its own last lines. The calls may land on either host (placement
    spreads them on a loaded machine), so what each node must show follows from where each ran."""
    await client.deploy(make_function(tmp_path, "talker", MANIFEST, {"main.py": TALKER}), tenant=tenant)
    outcomes = [await client.invoke(tenant, "talker", f"n{i}".encode()) for i in range(3)]
    last = await client.logs(tenant, "talker", lines=2)
    await client.remove(tenant, "talker")
    after_removal = await client.logs(tenant, "talker", lines=1)
    with pytest.raises(ClientError) as unknown:
        await client.logs(tenant, "never-deployed")
    with pytest.raises(ClientError) as invalid:
        await client.logs(tenant, "a.b")

    assert [o.error for o in outcomes if not o.ok] == []
    last_call_on = {o.node: o.reply.output.decode() for o in outcomes}  # node -> its last call
    calls_on = Counter(o.node for o in outcomes)
    tails = {logs.node: logs for logs in last.logs}
    assert set(tails) == set(last_call_on)
    for node, logs in tails.items():
        assert logs.lines == [f"out {last_call_on[node]}", f"err {last_call_on[node]}"]
        assert logs.truncated == (calls_on[node] > 1), "more lines than the two asked for"
    assert max(calls_on.values()) > 1, "three calls on the cluster's two hosts: one ran two"
    assert {logs.node: logs.lines for logs in after_removal.logs} == {
        node: [f"err {n}"] for node, n in last_call_on.items()
    }
    assert unknown.value.error.code == "not_found"
    assert invalid.value.error.code == "bad_request" and "'a.b' must match" in invalid.value.error.message
