"""Poison in the store: records that do not decode, or break their kind's rules, planted at every
prefix the services read. Each is reported with its key and skipped; `status`, `ls`, invocations
and `hetfaas up` itself keep working. Numbers are checked when written and when read."""

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from deploy import launcher
from schemas import codec, keys
from schemas.messages import FunctionRecord, FunctionSpec, TenantRecord
from tests.integration.conftest import EXAMPLES, HOST_OVERRIDES, raw_request, wait_for_nodes
from tests.integration.test_cli import hetfaas

pytestmark = pytest.mark.integration

GARBAGE = b"\xc1 not msgpack"


@pytest.fixture
def poisoned(tmp_path: Path) -> Iterator[launcher.ClusterInfo]:
    info = launcher.up(tmp_path / "state", hosts=1, host_overrides=HOST_OVERRIDES)
    try:
        asyncio.run(wait_for_nodes(info, 1))  # up returns with the processes started, not ready
        yield info
    finally:
        if (current := launcher.read_cluster(Path(info.state_dir))) is not None:
            launcher.stop(current)


def _negative_memory() -> bytes:
    spec = FunctionSpec(name="neg", tenant="poison", runtime="python", handler="m:f", memory_mb=-1)
    return codec.encode(FunctionRecord(spec=spec, bundle_digest="sha256-x", bundle_size=1, deployed_at=0))


def _a_path_for_a_digest() -> bytes:
    spec = FunctionSpec(name="path", tenant="poison", runtime="python", handler="m:f")
    return codec.encode(FunctionRecord(spec=spec, bundle_digest="../../etc", bundle_size=1, deployed_at=0))


async def plant(info: launcher.ClusterInfo) -> None:
    async with launcher.operator_store(info) as store:
        await store.put(keys.function("poison", "junk"), GARBAGE)
        await store.put(keys.function("poison", "neg"), _negative_memory())
        await store.put(keys.function("poison", "path"), _a_path_for_a_digest())
        # what a writer without the checks would store: built, not decoded, so never validated
        await store.put(
            keys.tenant("poison"), codec.encode(TenantRecord(tenant="poison", max_concurrency=-5))
        )
        await store.put(keys.tenant("huge"), codec.encode(TenantRecord(tenant="huge", max_concurrency=2**40)))
        await store.put(keys.tenant("junk"), GARBAGE)
        await store.put(keys.scheduler("ghost"), GARBAGE)
        lease = await store._grant(60)
        await store.put(keys.node("ghost"), GARBAGE, lease=lease)
        await store.put(keys.program("d" * 64, "poison", "f"), GARBAGE)
        await store.put(keys.revoked("e" * 64), GARBAGE)


def test_garbage_records_are_skipped_and_reported(poisoned: launcher.ClusterInfo) -> None:
    info, state = poisoned, poisoned.state_dir
    deployed = hetfaas(state, "deploy", str(EXAMPLES / "hello-python"), "--tenant", "poison")
    assert deployed.returncode == 0, deployed.stderr
    asyncio.run(plant(info))
    assert hetfaas(state, "down").returncode == 0
    up = hetfaas(state, "up", "--hosts", "1", "--verifiers", "0", timeout_s=90)
    assert up.returncode == 0, up.stderr  # the replica serves, with the poison in place

    status = hetfaas(state, "status", "--json")
    listed = hetfaas(state, "ls", "--tenant", "poison", "--json")
    invoked = hetfaas(state, "invoke", "hello", "--tenant", "poison", "--data", "x", "--json")
    assert status.returncode == 0, status.stderr
    assert listed.returncode == 0, listed.stderr
    assert [f["spec"]["name"] for f in json.loads(listed.stdout)] == ["hello"]
    assert invoked.returncode == 0, invoked.stderr  # its limit of -5 is not its limit
    log = (Path(state) / "logs" / "scheduler-0.log").read_text()
    for key in (
        keys.function("poison", "junk"),
        keys.tenant("junk"),
        keys.scheduler("ghost"),
        keys.node("ghost"),
    ):
        assert f"skipping the unreadable record at {key}" in log, key
    assert f"skipping the unreadable record at {keys.tenant('poison')}: Expected `int` >= 1" in log
    assert f"skipping the unreadable record at {keys.tenant('huge')}: Expected `int` <= 1000000" in log
    assert f"skipping the record at {keys.function('poison', 'neg')}: memory_mb" in log
    assert (
        f"skipping the record at {keys.function('poison', 'path')}: '../../etc' is not a bundle digest" in log
    )


async def test_a_limit_out_of_range_is_refused_when_set(cluster: launcher.ClusterInfo, harness) -> None:
    for limit in (-5, 0, 2**40):
        body = msgspec.msgpack.encode({"type": "set_tenant", "tenant": "alice", "max_concurrency": limit})
        reply = await raw_request(harness, "hetfaas.admin.tenant", body)
        assert reply.error.code == "bad_request", limit
    refused = hetfaas(cluster.state_dir, "tenant", "set", "alice", "--max-concurrency", "0")
    assert refused.returncode == 2 and b"0 is not in the range" in refused.stderr
