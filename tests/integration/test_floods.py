"""Floods of names a message makes up: heartbeats of 100 000 nodes nobody registered and beats of
100 000 replicas that do not exist leave a scheduler's memory bounded and its service intact.
Sent with credentials allowed everything (a stand-in for an identity that misbehaves: NATS
lets a node beat only on its own subject). Its own cluster: the flood shrinks replicas' shares."""

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cli.client import Client
from deploy import launcher
from fabric import bus
from scheduler.service import MAX_REPLICAS
from schemas import codec, subjects
from schemas.messages import Heartbeat, ReplicaBeat
from tests.integration.conftest import HOST_OVERRIDES, harness_creds, rss_mb

pytestmark = pytest.mark.integration
FLOOD = 100_000


@pytest.fixture
async def small(tmp_path: Path) -> AsyncIterator[tuple[launcher.ClusterInfo, Client]]:
    info = launcher.up(tmp_path / "state", hosts=1, host_overrides=HOST_OVERRIDES)
    client = await Client.connect(info.nats_url, creds=info.nats_creds)
    try:
        await client.wait_until_ready(1, timeout_s=30)
        yield info, client
    finally:
        await client.close()
        launcher.stop(info)


async def test_unique_names_cannot_grow_a_scheduler(small) -> None:
    info, client = small
    pid = info.processes["scheduler-0"]
    before = rss_mb(pid)
    nc = await bus.connect(info.nats_url, "flooder", creds=harness_creds(info))
    try:
        tag = os.urandom(3).hex()
        for i in range(FLOOD):
            node, replica = f"ghost-{tag}-{i}", f"phantom-{tag}-{i}"
            beat = Heartbeat(node_id=node, seq=0, inflight=0, capacity=64, instances=0)
            await nc.publish(subjects.heartbeat(node), codec.encode(beat))
            claim = ReplicaBeat(
                scheduler_id=replica, seq=0, running=0, queued=0, throttled=0, etcd_ok=True,
                view_age_ms=0.0, nodes_healthy=0, arrivals={f"t/f{i}": 0.0},
            )  # fmt: skip
            await nc.publish(subjects.replica_beat(replica), codec.encode(claim))
            if i % 5000 == 0:
                await nc.flush()
        await nc.flush()
    finally:
        await bus.close(nc)
    status = await client.status()  # answered after the flood: NATS delivers in order
    grown = rss_mb(pid) - before
    assert grown < 40, f"the scheduler grew {grown:.0f} MB"  # unbounded: ~115 MB for this flood
    assert len(status.replicas) <= MAX_REPLICAS + 1
    assert [n.node_id for n in status.nodes] == ["host-1"] and status.nodes[0].healthy
    outcome = await asyncio.wait_for(client.status(), 5)
    assert outcome.nodes[0].node_id == "host-1"
