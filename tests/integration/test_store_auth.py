"""Identity and least privilege in etcd: anonymous clients and wrong passwords are refused, each
service's etcd user reaches only its role's keys, and the schedulers ignore a node key that no
live node wrote for itself. Against the shared cluster, secured as `hetfaas up` secures every one."""

import asyncio
import os
from pathlib import Path

import grpc
import pytest
from etcd3aio.errors import EtcdPermissionDeniedError, EtcdUnauthenticatedError

from cli.client import Client
from deploy import launcher
from fabric import credentials
from fabric.store import Store
from schemas import codec, keys, version
from schemas.messages import NodeRecord

pytestmark = pytest.mark.integration


def store_as(cluster: launcher.ClusterInfo, login: credentials.EtcdLogin | None) -> Store:
    return Store([cluster.etcd_endpoint], login=login)


def login_of(cluster: launcher.ClusterInfo, role, name: str) -> credentials.EtcdLogin:
    path = launcher.issue_etcd_creds(cluster, role, name)
    assert path.stat().st_mode & 0o777 == 0o600
    return credentials.read_etcd_login(path)


async def test_anonymous_and_wrong_passwords_are_refused(cluster: launcher.ClusterInfo) -> None:
    async with store_as(cluster, None) as anonymous:
        for attempt in (
            anonymous.get(keys.tenant("alice")),
            anonymous.put(keys.function("alice", "f"), b"x"),
        ):
            with pytest.raises(grpc.aio.AioRpcError, match="user name is empty"):
                await attempt
    guessed = credentials.EtcdLogin(login_of(cluster, "host", "host-1").user, "guessed")
    async with store_as(cluster, guessed) as impostor:
        with pytest.raises(EtcdUnauthenticatedError, match="invalid user ID or password"):
            await impostor.get(keys.node("host-1"))


async def test_each_service_reaches_only_its_roles_keys(cluster: launcher.ClusterInfo) -> None:
    async with store_as(cluster, login_of(cluster, "host", "host-1")) as host:
        assert await host.get(keys.node("host-1")) is not None, "a node reads its own registration"
        await host.list_prefix(keys.PROGRAMS)  # approvals it may load
        for forbidden in (
            host.put(keys.node("host-2"), b"x"),  # another node's registration
            host.put(keys.function("alice", "secret"), b"x"),  # a tenant's function record
            host.put(keys.tenant("alice"), b"x"),  # a tenant's limits
            host.delete(keys.revoked("d" * 64)),  # a revocation
            host.list_prefix(keys.FUNCTIONS),  # every tenant's functions
            host.put(keys.scheduler("scheduler-0"), b"x"),  # a replica's registration
        ):
            with pytest.raises(EtcdPermissionDeniedError):
                await forbidden
    async with store_as(cluster, login_of(cluster, "scheduler", "scheduler-0")) as scheduler:
        await scheduler.list_prefix(keys.FUNCTIONS)
        for forbidden in (
            scheduler.put(keys.node("host-1"), b"x"),  # nodes state their own registrations
            scheduler.put(keys.scheduler("scheduler-9"), b"x"),  # another replica's
        ):
            with pytest.raises(EtcdPermissionDeniedError):
                await forbidden


async def nodes_once_seen(client: Client, node_id: str) -> set[str]:
    """The nodes the scheduler knows, once it knows `node_id`."""
    async with asyncio.timeout(10):
        while True:
            if node_id in (nodes := {n.node_id for n in (await client.status()).nodes}):
                return nodes
            await asyncio.sleep(0.05)


def _record(node_id: str, wire: int = version.WIRE) -> bytes:
    record = NodeRecord(
        node_id=node_id,
        kind="host",
        hostname="fake",
        pid=1,
        capacity=10_000,
        started_at=0.0,
        memory_mb=1 << 20,
        wire=wire,
    )
    return codec.encode(record)


async def test_schedulers_ignore_node_keys_no_live_node_wrote(
    cluster: launcher.ClusterInfo, client: Client
) -> None:
    """The issue's fake node was an unleased key with a generous record. Even written with root's
    rights (no service has them), a key without a lease, or whose record names another node, is
    ignored and logged; a leased key written after them is seen, so the scheduler did read them."""
    tag = f"x{os.getpid()}"
    unleased, misnamed, witness = keys.node(f"{tag}-unleased"), keys.node(f"{tag}-misnamed"), f"{tag}-witness"
    async with launcher.operator_store(cluster) as root:
        lease = await root._grant(30)
        try:
            await root.put(unleased, _record(f"{tag}-unleased"))
            await root.put(misnamed, _record("host-1"), lease=lease)
            await root.put(keys.node(witness), _record(witness), lease=lease)

            nodes = await nodes_once_seen(client, witness)  # etcd's events come in order
            assert f"{tag}-unleased" not in nodes and f"{tag}-misnamed" not in nodes
            assert {"host-1", "host-2"} <= nodes
            capacities = {n.node_id: n.capacity for n in (await client.status()).nodes}
            assert capacities["host-1"] != 10_000, "host-1's registration is its own, not the forged one"
            log = (Path(cluster.state_dir) / "logs" / "scheduler-0.log").read_text()
            assert f"ignoring {unleased}: not under a lease" in log
            assert f"ignoring {misnamed}: its record names node 'host-1'" in log
        finally:
            await root._revoke(lease)
            await root.delete(unleased)


@pytest.mark.parametrize(
    "written", ["http://localhost:{port}", "localhost:{port}", "http://127.0.0.1:{port}/"]
)
async def test_endpoints_written_as_urls_and_names_reach_etcd(
    cluster: launcher.ClusterInfo, written: str
) -> None:
    port = cluster.etcd_endpoint.rsplit(":", 1)[1]
    login = login_of(cluster, "host", "host-1")
    async with Store([written.format(port=port)], login=login) as host:
        assert await host.get(keys.node("host-1")) is not None


async def test_every_registration_states_its_version_and_another_wire_contract_gets_no_work(
    cluster: launcher.ClusterInfo, client: Client
) -> None:
    """A rolling upgrade shows in `status`; a node speaking another wire contract (it could not
    decode the scheduler's requests, nor the scheduler its answers) is left out, and says why."""
    tag = f"w{os.getpid()}"
    future, witness = f"{tag}-future", f"{tag}-witness"
    async with launcher.operator_store(cluster) as root:
        lease = await root._grant(30)
        try:
            await root.put(keys.node(future), _record(future, wire=version.WIRE + 1), lease=lease)
            await root.put(keys.node(witness), _record(witness), lease=lease)
            nodes = await nodes_once_seen(client, witness)
            status = await client.status()
        finally:
            await root._revoke(lease)

    assert future not in nodes
    release = version.release()
    assert {n.node_id: n.version for n in status.nodes if n.node_id.startswith("host-")} == {
        "host-1": release,
        "host-2": release,
    }
    assert all(s.version == release and s.wire == version.WIRE for s in status.schedulers)
    log = (Path(cluster.state_dir) / "logs" / "scheduler-0.log").read_text()
    assert f"not placing on node {future}: it runs hetfaas (unknown), wire contract {version.WIRE + 1}" in log
