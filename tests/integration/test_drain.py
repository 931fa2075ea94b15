"""`hetfaas node drain` / `uncordon`: a drained node gets no new placements (on any replica, its
cordon kept in etcd), its running invocation finishes, its warm instances are released; and
uncordoned, it is placed on again."""

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.client import Client, ClientError
from deploy import launcher
from tests.integration.conftest import make_function

pytestmark = pytest.mark.integration

HANDLER = 'import time\n\ndef handle(payload):\n    time.sleep(float(payload or b"0"))\n    return "done"\n'


async def warm_on_both(client: Client, tenant: str) -> None:
    """8 calls at once (a node holds 4 instances of the function), then until both nodes'
    heartbeats report idle warm instances."""
    burst = await asyncio.gather(*(client.invoke(tenant, "nap", b"0.3", timeout_ms=20_000) for _ in range(8)))
    assert all(o.ok for o in burst), [o.error for o in burst if not o.ok]
    async with asyncio.timeout(10):
        while True:
            idle = {n.node_id: n.warm_idle for n in (await client.status()).nodes}
            if idle.get("host-1", 0) > 0 and idle.get("host-2", 0) > 0:
                return
            await asyncio.sleep(0.05)


async def running_everywhere(client: Client, since: float) -> None:
    """Until both nodes have invocations in flight, as heartbeats sent after `since` say (an
    older one may still count the warm-up's calls)."""
    async with asyncio.timeout(10):
        while True:
            nodes = {n.node_id: n for n in (await client.status()).nodes}
            elapsed_ms = (time.monotonic() - since) * 1000
            if all(
                (n := nodes.get(name)) is not None
                and n.inflight > 0
                and n.heartbeat_age_ms is not None
                and n.heartbeat_age_ms < elapsed_ms
                for name in ("host-1", "host-2")
            ):
                return
            await asyncio.sleep(0.05)


async def test_a_drained_node_finishes_its_work_releases_its_instances_and_gets_no_more(
    cluster: launcher.ClusterInfo, client: Client, tmp_path: Path, tenant: str
) -> None:
    manifest = 'runtime = "python"\nhandler = "main:handle"\nmemory_mb = 64\nconcurrency = 4\n'
    await client.deploy(make_function(tmp_path, "nap", manifest, {"main.py": HANDLER}), tenant=tenant)
    await warm_on_both(client, tenant)
    launched = time.monotonic()
    # 8 calls of 2 s: more than one node's 4 instances of the function, so both nodes run some
    long_calls = [
        asyncio.ensure_future(client.invoke(tenant, "nap", b"2", timeout_ms=10_000)) for _ in range(8)
    ]
    await running_everywhere(client, launched)
    try:
        drained = await client.drain("host-1")
        after = [await client.invoke(tenant, "nap", b"0") for _ in range(20)]
        finished = await asyncio.gather(*long_calls)
        status = await client.status()
        cli = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "cli", "status"],
            capture_output=True,
            env={"HETFAAS_STATE_DIR": cluster.state_dir, "PATH": "/usr/bin:/bin"},
            timeout=30,
        )
    finally:
        undrained = await client.drain("host-1", drain=False)
    # host-2 has the warm instances now, so it is preferred: a burst beyond its 4 reaches host-1
    burst = await asyncio.gather(*(client.invoke(tenant, "nap", b"0.5", timeout_ms=10_000) for _ in range(8)))
    again = {o.reply.node for o in burst if o.ok}
    uncordoned = next(n for n in (await client.status()).nodes if n.node_id == "host-1")

    assert drained.cordoned and drained.released + drained.running >= 1, drained
    assert "host-1" in {o.reply.node for o in finished if o.ok}, "some of the long calls ran on host-1"
    assert all(o.ok and o.reply.node == "host-2" for o in after), [o.reply.node for o in after if o.ok]
    assert all(o.ok for o in finished), "invocations running on the drained node finish"
    host_1 = next(n for n in status.nodes if n.node_id == "host-1")
    assert host_1.cordoned and host_1.warm_idle == 0, host_1
    assert "healthy,SchedulingDisabled" in cli.stdout.decode(), cli.stdout.decode()
    assert not undrained.cordoned and not uncordoned.cordoned
    assert "host-1" in again, again


async def test_draining_an_unknown_node_is_not_found(client: Client) -> None:
    with pytest.raises(ClientError) as refused:
        await client.drain("no-such-node")
    assert refused.value.error.code == "not_found" and "host-1" in refused.value.error.message
