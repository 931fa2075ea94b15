"""Rotating the account's signing key (`hetfaas account rotate-signing-key`, then
`retire-signing-keys`): nothing stops working in between, and afterwards users signed by the old
key are shut out while the services carry on with the credentials issued under the new one. Its
own cluster: retiring the key closes every connection the shared cluster's tests hold."""

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cli.client import Client, ClientError, InvokeOutcome
from deploy import launcher
from fabric import credentials
from tests.integration.conftest import EXAMPLES, HOST_OVERRIDES, SCHEDULER_OVERRIDES, wait_for_nodes
from tests.integration.test_cli import hetfaas

pytestmark = pytest.mark.integration


@pytest.fixture
async def cluster_of_one(tmp_path: Path) -> AsyncIterator[launcher.ClusterInfo]:
    info = launcher.up(
        tmp_path / "state", hosts=1, host_overrides=HOST_OVERRIDES, scheduler_overrides=SCHEDULER_OVERRIDES
    )
    try:
        await wait_for_nodes(info, 1)
        yield info
    finally:
        launcher.stop(info)


def cli_json(info: launcher.ClusterInfo, *args: str) -> dict:
    done = hetfaas(info.state_dir, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def test_rotating_the_signing_key(cluster_of_one: launcher.ClusterInfo, tmp_path: Path) -> None:
    info = cluster_of_one
    old_creds, new_creds = str(tmp_path / "old.creds"), str(tmp_path / "new.creds")
    cli_json(info, "tenant", "create", "alice", "--out", old_creds)
    old = await Client.connect(info.nats_url, creds=old_creds)
    await old.deploy(EXAMPLES / "hello-python")
    assert (await old.invoke("alice", "hello", b"before")).ok

    service_creds = Path(info.state_dir) / "secrets" / "creds" / "scheduler-0.creds"
    user_before = credentials.read_creds(service_creds).user
    rotated = cli_json(info, "account", "rotate-signing-key")
    shown = cli_json(info, "account", "show")
    assert shown["signing_keys"] == [rotated["signing_key"], *rotated["retiring"]]
    assert "scheduler-0" in rotated["reissued"] and "host-1" in rotated["reissued"]
    assert credentials.read_creds(service_creds).user != user_before
    outcome = await old.invoke("alice", "hello", b"between")
    assert outcome.ok, "step 1 stops nothing: the old key still vouches for its users"

    cli_json(info, "tenant", "create", "alice", "--out", new_creds)
    new = await Client.connect(info.nats_url, creds=new_creds)
    operator = None
    try:
        # a user keeps invoking through step 2: the servers close the services' connections
        # (their users were signed by the retired key), which reconnect with step 1's files
        calls = asyncio.create_task(invoke_until(new, stop := asyncio.Event()))
        retired = await asyncio.to_thread(cli_json, info, "account", "retire-signing-keys")
        assert retired["retired"] == rotated["retiring"]
        with pytest.raises(ClientError) as refused:
            await Client.connect(info.nats_url, creds=old_creds)
        assert refused.value.error.code == "unauthorized"
        # the servers close what the retired key signed (nats-py tells only a callback of its own)
        async with asyncio.timeout(5):
            while not old.nc.is_closed:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        operator = await Client.connect(info.nats_url, creds=info.nats_creds)  # issued again in step 1
        await operator.wait_until_ready(1, timeout_s=10)  # the services reconnected with their new files
        outcome = await new.invoke("alice", "hello", b"after")
        assert outcome.ok, outcome.error
        assert b"after" in outcome.reply.output
        stop.set()
        outcomes = await calls
        assert len(outcomes) > 3 and [o.error for o in outcomes if not o.ok] == [], "no call failed"
    finally:
        await new.close()
        await old.close()
        if operator is not None:
            await operator.close()


async def invoke_until(client: Client, stop: asyncio.Event) -> list[InvokeOutcome]:
    outcomes = []
    while not stop.is_set():
        outcomes.append(await client.invoke("alice", "hello", b"during"))
    return outcomes
