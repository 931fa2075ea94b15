"""A node id is one node's: a second node started with an id a live node holds is refused (it
exits non-zero naming the id) before it touches anything of the first's, which goes on serving."""

import asyncio
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from cli.client import Client
from deploy import launcher, services
from fabric.settings import load_settings, write_settings
from host_node.settings import HostNodeSettings
from tests.integration.conftest import IDENTITY, make_function

pytestmark = pytest.mark.integration

HANDLER = IDENTITY + "\ndef handle(payload):\n    return identity()\n"


def duplicate_of(cluster: launcher.ClusterInfo, node_id: str, work: Path) -> Path:
    """Settings of a second node with `node_id`: the same credentials, its own files."""
    settings = load_settings(HostNodeSettings, Path(cluster.state_dir) / "config" / f"{node_id}.toml")
    settings = msgspec.structs.replace(
        settings, work_dir=str(work / "data"), metrics_listen=f"127.0.0.1:{services.free_port()}"
    )
    path = work / "duplicate.toml"
    write_settings(settings, path)
    return path


async def test_a_second_node_with_a_live_nodes_id_is_refused(
    cluster: launcher.ClusterInfo, client: Client, tmp_path: Path, tenant: str
) -> None:
    manifest = 'runtime = "python"\nhandler = "main:handle"\nmemory_mb = 64\n'
    await client.deploy(make_function(tmp_path, "who", manifest, {"main.py": HANDLER}), tenant=tenant)
    before = await client.invoke(tenant, "who", b"")
    assert before.ok, before.error
    node_id = before.reply.node
    config = duplicate_of(cluster, node_id, tmp_path)

    second = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "host_node", "--config", str(config)],
        capture_output=True,
        timeout=60,
    )
    after = [await client.invoke(tenant, "who", b"") for _ in range(5)]

    errors = second.stderr.decode()
    assert second.returncode == 1, errors
    assert f"'{node_id}' is already registered" in errors and "Traceback" not in errors, errors
    assert all(o.ok and o.reply.node == node_id for o in after), after
    assert {o.reply.output for o in after} == {before.reply.output}, (
        "the first node's warm instance is untouched"
    )
