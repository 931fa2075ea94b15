"""A host node on "another machine": its own network namespace, reaching NATS and etcd over a veth
link only, as a node on a different host would. The code travels to it through JetStream."""

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cli.client import Client
from deploy import launcher
from tests.integration.conftest import EXAMPLES, HOST_OVERRIDES, SCHEDULER_OVERRIDES

pytestmark = [pytest.mark.integration, pytest.mark.privileged]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def other_machine() -> Iterator[tuple[str, str]]:
    """A network namespace joined to this one by a veth pair: (namespace, our address on the link)."""
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed (deploy/setup.sh installs it)")
    tag = os.getpid() % 250
    namespace, ours, theirs = f"hetfaas-test-{os.getpid()}", f"hfa{os.getpid()}", f"hfb{os.getpid()}"
    here, there = f"10.231.{tag}.1", f"10.231.{tag}.2"
    ip("netns", "add", namespace)
    try:
        ip("link", "add", ours, "type", "veth", "peer", "name", theirs)
        ip("link", "set", theirs, "netns", namespace)
        ip("addr", "add", f"{here}/30", "dev", ours)
        ip("link", "set", ours, "up")
        ip("netns", "exec", namespace, "ip", "addr", "add", f"{there}/30", "dev", theirs)
        ip("netns", "exec", namespace, "ip", "link", "set", theirs, "up")
        ip("netns", "exec", namespace, "ip", "link", "set", "lo", "up")
        yield namespace, here
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", ours], capture_output=True)  # gone with the namespace, usually


def net_namespace(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


async def test_a_node_on_another_machine_runs_functions(
    other_machine: tuple[str, str], tmp_path: Path
) -> None:
    namespace, address = other_machine
    info = launcher.up(
        tmp_path / "state",
        hosts=0,
        listen_host=address,
        host_overrides=HOST_OVERRIDES,
        scheduler_overrides=SCHEDULER_OVERRIDES,
    )
    client = None
    try:
        launcher.start_host(info, 1, HOST_OVERRIDES, netns=namespace)
        client = await Client.connect(info.nats_url, "multihost-test", creds=info.nats_creds)
        await client.wait_until_ready(1, timeout_s=30)
        await client.deploy(EXAMPLES / "hello-python")
        first = await client.invoke("default", "hello", b"far away", timeout_ms=10_000)
        second = await client.invoke("default", "hello", b"again", timeout_ms=10_000)
        where = {
            "node": net_namespace(info.processes["host-1"]),
            "other machine": os.stat(f"/run/netns/{namespace}").st_ino,
            "here": net_namespace(os.getpid()),
        }
    finally:
        if client is not None:
            await client.close()
        launcher.stop(info)

    assert first.ok and second.ok, (first.error, second.error)
    assert json.loads(first.reply.output)["greeting"] == "hello, far away!"
    assert first.reply.cold_start and "bundle_fetch_ms" in first.reply.phases_ms, "code fetched over the link"
    assert not second.reply.cold_start
    assert where["node"] == where["other machine"] != where["here"], where


def cut_etcd(namespace: str, etcd_port: int) -> None:
    """Drop everything the namespace sends to etcd's port (nftables in that namespace only)."""
    run = ["ip", "netns", "exec", namespace, "nft"]
    subprocess.run([*run, "add", "table", "inet", "partition"], check=True, capture_output=True)
    chain = "{ type filter hook output priority 0; }"
    subprocess.run([*run, "add", "chain", "inet", "partition", "out", chain], check=True, capture_output=True)
    rule = ["add", "rule", "inet", "partition", "out", "tcp", "dport", str(etcd_port), "drop"]
    subprocess.run([*run, *rule], check=True, capture_output=True)


def heal(namespace: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", namespace, "nft", "delete", "table", "inet", "partition"], check=True
    )


async def replicas_seen(client: Client, asks: int) -> tuple[set[str], dict[str, bool]]:
    """Which replicas answered `asks` status requests (the queue group's), and whether each is
    fenced as the last answer's replica table says."""
    answered, fenced = set(), {}
    for _ in range(asks):
        status = await client.status()
        answered.add(status.answered_by)
        fenced = {beat.scheduler_id: beat.fenced for beat in status.replicas}
    return answered, fenced


async def eventually(client: Client, holds: Callable[[dict[str, bool]], bool], timeout_s: float) -> bool:
    """Until the replica table (as some replica last heard the others' beats) says `holds`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if holds((await replicas_seen(client, 1))[1]):
            return True
        await asyncio.sleep(0.2)  # a fraction of a beat interval: the table changes with beats
    return False


async def test_a_scheduler_cut_off_from_etcd_takes_no_work_until_it_is_back(
    other_machine: tuple[str, str], tmp_path: Path
) -> None:
    if shutil.which("nft") is None:
        pytest.skip("nftables' `nft` is not installed (deploy/setup.sh installs it)")
    namespace, address = other_machine
    info = launcher.up(
        tmp_path / "state",
        hosts=1,
        listen_host=address,
        host_overrides=HOST_OVERRIDES,
        scheduler_overrides=SCHEDULER_OVERRIDES,
    )
    client = None
    try:
        launcher.start_scheduler(info, 1, SCHEDULER_OVERRIDES, netns=namespace)
        client = await Client.connect(info.nats_url, "partition-test", creds=info.nats_creds)
        await client.wait_until_ready(1, schedulers=2, timeout_s=30)
        await client.deploy(EXAMPLES / "hello-python")
        before, _ = await replicas_seen(client, 40)

        cut_etcd(namespace, info.etcd_client_port)
        fenced_in_time = await eventually(client, lambda fenced: fenced.get("scheduler-1") is True, 20)
        during, _ = await replicas_seen(client, 40)
        calls = [await client.invoke("default", "hello", b"cut", timeout_ms=10_000) for _ in range(20)]

        heal(namespace)
        healed_in_time = await eventually(client, lambda fenced: fenced.get("scheduler-1") is False, 30)
        after, _ = await replicas_seen(client, 40)
    finally:
        if client is not None:
            await client.close()
        launcher.stop(info)

    assert before == {"scheduler-0", "scheduler-1"}, before
    assert fenced_in_time, "the cut-off replica says it is fenced"
    assert during == {"scheduler-0"}, "while fenced it takes nothing from the queue group"
    assert all(call.ok for call in calls), [call.error for call in calls if not call.ok]
    assert healed_in_time and after == {"scheduler-0", "scheduler-1"}, after
