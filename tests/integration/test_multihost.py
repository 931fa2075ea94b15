"""A host node on "another machine": its own network namespace, reaching NATS and etcd over a veth
link only, as a node on a different host would. The code travels to it through JetStream."""

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
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
