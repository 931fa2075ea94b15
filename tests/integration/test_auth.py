"""Identity from credentials, least privilege on the bus: a second tenant with its own credentials
tries what a hostile tenant would (raw nats-py and the CLI) and is refused; so are anonymous
clients and a node acting as a scheduler; a revoked tenant is shut out while others keep working.
Against the shared cluster, which is secured as `hetfaas up` secures every cluster."""

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import nats
import nats.errors
import pytest

from cli.client import Client, ClientError
from deploy import authority, launcher
from fabric.connection import Connection
from schemas import codec, subjects
from schemas.messages import (
    DeployRequest,
    FunctionSpec,
    Heartbeat,
    InvokeReply,
    ListFunctions,
    NodeInvoke,
    ReplicaBeat,
    SetTenant,
)
from tests.integration.conftest import make_function
from tests.integration.test_cli import hetfaas

pytestmark = pytest.mark.integration

HANDLER = "def handle(payload):\n    return b'ran:' + payload\n"


def create_tenant(cluster: launcher.ClusterInfo, name: str, tmp_path: Path) -> str:
    out = tmp_path / f"{name}.creds"
    created = hetfaas(cluster.state_dir, "tenant", "create", name, "--out", str(out), "--json")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["tenant"] == name
    assert out.stat().st_mode & 0o777 == 0o600
    return str(out)


class Probe:
    """A raw nats-py connection and the permission violations the server reports to it."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self._seen = asyncio.Event()
        self.nc: nats.NATS | None = None

    async def connect(self, url: str, creds: str, inbox: str) -> "Probe":
        async def on_error(exc: Exception) -> None:
            self.violations.append(str(exc).lower())
            self._seen.set()

        self.nc = await nats.connect(
            url, user_credentials=creds, inbox_prefix=inbox, error_cb=on_error, allow_reconnect=False
        )
        return self

    async def refused(self, what: str, subject: str) -> bool:
        """Whether the server reported a violation naming `subject` (it does so for every
        publish or subscription it refuses, to the connection that tried)."""
        async with asyncio.timeout(5):
            while not any(f'{what} to "{subject.lower()}"' in v for v in self.violations):
                self._seen.clear()
                await self._seen.wait()
        return True


@pytest.fixture
async def mallory(cluster: launcher.ClusterInfo, tmp_path: Path) -> AsyncIterator[Probe]:
    probe = await Probe().connect(
        cluster.nats_url, create_tenant(cluster, "mallory", tmp_path), subjects.tenant_inbox("mallory")
    )
    yield probe
    await probe.nc.close()


async def deploy_as(cluster: launcher.ClusterInfo, creds: str, root: Path, name: str) -> Client:
    client = await Client.connect(cluster.nats_url, "auth-test", creds=creds)
    await client.deploy(
        make_function(root, name, 'runtime = "python"\nhandler = "main:handle"\n', {"main.py": HANDLER})
    )
    return client


async def test_anonymous_clients_are_refused(cluster: launcher.ClusterInfo, tmp_path: Path) -> None:
    with pytest.raises(ClientError) as refused:
        await Client.connect(cluster.nats_url, "anonymous")
    assert refused.value.error.code == "unauthorized"
    forged = tmp_path / "forged.creds"
    forged.write_text("not a credentials file")
    with pytest.raises(ClientError, match="not a NATS credentials file"):
        await Client.connect(cluster.nats_url, "forged", creds=str(forged))


async def test_a_tenant_cannot_act_for_another(
    cluster: launcher.ClusterInfo, client: Client, tenant: str, tmp_path: Path, mallory: Probe
) -> None:
    """The victim's function, deployed by the operator; mallory tries to reach it, replace it,
    list it, read its replies and skip admission, every way the bus offers."""
    victim = make_function(
        tmp_path, "secret", 'runtime = "python"\nhandler = "main:handle"\n', {"main.py": HANDLER}
    )
    await client.deploy(victim, tenant)
    nc = mallory.nc
    assert nc is not None

    # the CLI and the client refuse at once, with a clear error
    as_victim = hetfaas(
        cluster.state_dir,
        "--creds",
        create_tenant(cluster, "mallory", tmp_path),
        "invoke",
        "secret",
        "--tenant",
        tenant,
    )
    assert as_victim.returncode == 4 and b"unauthorized" in as_victim.stderr
    # the server refuses what a raw client tries
    await nc.publish(subjects.invoke(tenant, "secret"), b"x")
    assert await mallory.refused("publish", subjects.invoke(tenant, "secret"))
    for subject in (">", "hetfaas.>", f"{subjects.tenant_inbox(tenant)}.>", "$O.hetfaas-bundles.>"):
        await nc.subscribe(subject)
        assert await mallory.refused("subscription", subject)
    spec = FunctionSpec(name="secret", tenant=tenant, runtime="python", handler="main:handle")
    node_invoke = NodeInvoke(
        invocation_id="x", spec=spec, bundle_digest="sha256-" + "0" * 64, payload=b"", timeout_ms=1000
    )
    beat = Heartbeat(node_id="fake", seq=0, inflight=0, capacity=64, instances=0)
    for subject, body in (
        (subjects.node_invoke("host-1"), node_invoke),
        (subjects.heartbeat("fake"), beat),
        (
            subjects.replica_beat("fake"),
            ReplicaBeat(
                scheduler_id="fake",
                seq=0,
                running=0,
                queued=0,
                throttled=0,
                etcd_ok=True,
                view_age_ms=0,
                nodes_healthy=9,
            ),
        ),
        (subjects.SET_TENANT, SetTenant(tenant=tenant, max_concurrency=1)),
        (subjects.control(tenant, subjects.REMOVE), ListFunctions(tenant=tenant)),
        (subjects.verify(tenant), ListFunctions(tenant=tenant)),
        ("$JS.API.STREAM.INFO.OBJ_hetfaas-bundles", None),
    ):
        await nc.publish(subject, codec.encode(body) if body is not None else b"")
        assert await mallory.refused("publish", subject)

    # on her own subjects, a body naming the victim is refused by the scheduler
    own = subjects.control("mallory", subjects.DEPLOY)
    reply = await nc.request(
        own,
        codec.encode(DeployRequest(spec=spec, bundle_digest="sha256-" + "0" * 64, bundle_size=1)),
        timeout=5,
    )
    assert b"unauthorized" in reply.data
    listed = await nc.request(
        subjects.control("mallory", subjects.LIST_FUNCTIONS),
        codec.encode(ListFunctions(tenant=tenant)),
        timeout=5,
    )
    assert b"unauthorized" in listed.data

    # the victim's function is untouched: it still runs its own code
    outcome = await client.invoke(tenant, "secret", b"a")
    assert outcome.ok and outcome.reply.output == b"ran:a"


async def test_no_answer_goes_to_another_tenants_inbox(
    cluster: launcher.ClusterInfo, tmp_path: Path, mallory: Probe
) -> None:
    """Mallory invokes her own function with the victim's inbox as the reply subject: had the
    scheduler taken it, the node would have answered into the victim's inbox (a forged reply)."""
    victim_creds = create_tenant(cluster, "victim", tmp_path)
    mallory_creds = create_tenant(cluster, "mallory", tmp_path)
    victim = await Probe().connect(cluster.nats_url, victim_creds, subjects.tenant_inbox("victim"))
    own = await deploy_as(cluster, mallory_creds, tmp_path, "echo")
    try:
        forged_replies: asyncio.Queue = asyncio.Queue()
        await victim.nc.subscribe(f"{subjects.tenant_inbox('victim')}.>", cb=forged_replies.put)
        await victim.nc.flush()
        forged = codec.encode(own_request := _invoke("mallory", "echo", "forged"))
        assert own_request.tenant == "mallory"
        await mallory.nc.publish(
            subjects.invoke("mallory", "echo"), forged, reply=f"{subjects.tenant_inbox('victim')}.x.1"
        )
        honest = await mallory.nc.request(
            subjects.invoke("mallory", "echo"), codec.encode(_invoke("mallory", "echo", "honest")), timeout=10
        )
        assert isinstance(codec.invoke_result.decode(honest.data), InvokeReply)
        await victim.nc.flush()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1):  # bounded: it is an absence being shown
                await forged_replies.get()
    finally:
        await own.close()
        await victim.nc.close()


def _invoke(tenant: str, function: str, invocation_id: str):
    from schemas.messages import InvokeRequest

    return InvokeRequest(
        invocation_id=invocation_id, tenant=tenant, function=function, payload=b"p", timeout_ms=5000
    )


async def test_a_node_cannot_act_as_a_scheduler_or_write_bundles(cluster: launcher.ClusterInfo) -> None:
    host = await Probe().connect(
        cluster.nats_url,
        str(launcher.issue_creds(cluster, "host", "host-1")),
        subjects.service_inbox("host", "host-1"),
    )
    try:
        for subject in (
            subjects.node_invoke("host-2"),
            subjects.replica_beat("scheduler-0"),
            subjects.heartbeat("host-2"),
            subjects.invoke("any", "fn"),
            "$O.hetfaas-bundles.C.x",
            "$JS.API.STREAM.PURGE.OBJ_hetfaas-bundles",
        ):
            await host.nc.publish(subject, b"")
            assert await host.refused("publish", subject)
        await host.nc.subscribe(subjects.node_invoke("host-2"))
        assert await host.refused("subscription", subjects.node_invoke("host-2"))
    finally:
        await host.nc.close()


async def test_a_revoked_tenant_is_shut_out_and_others_keep_working(
    cluster: launcher.ClusterInfo, tmp_path: Path
) -> None:
    doomed_creds = create_tenant(cluster, "doomed", tmp_path)
    doomed = await deploy_as(cluster, doomed_creds, tmp_path / "d", "fn")
    keeps = await deploy_as(cluster, create_tenant(cluster, "keeps", tmp_path), tmp_path / "k", "fn")
    closed = asyncio.Event()

    async def on_closed() -> None:
        closed.set()

    await nats.connect(  # an open connection of the tenant, besides its client
        cluster.nats_url,
        user_credentials=doomed_creds,
        closed_cb=on_closed,
        allow_reconnect=False,
        inbox_prefix=subjects.tenant_inbox("doomed"),
    )
    try:
        assert (await doomed.invoke("doomed", "fn", b"1")).ok
        revoked = hetfaas(cluster.state_dir, "tenant", "revoke", "doomed", "--json")
        assert revoked.returncode == 0, revoked.stderr
        async with asyncio.timeout(10):  # the server closes the revoked user's open connections
            await closed.wait()
        with pytest.raises(ClientError) as refused:
            await Client.connect(cluster.nats_url, "again", creds=doomed_creds)
        assert refused.value.error.code == "unauthorized"
        again = hetfaas(cluster.state_dir, "--creds", doomed_creds, "ls")
        assert again.returncode == 4 and b"unauthorized" in again.stderr
        outcome = await keeps.invoke("keeps", "fn", b"2")
        assert outcome.ok and outcome.reply.output == b"ran:2"
        listed = hetfaas(cluster.state_dir, "tenant", "ls", "--json")
        rows = {row["tenant"]: row for row in json.loads(listed.stdout)}
        assert rows["doomed"]["active"] == 0 and rows["keeps"]["active"] >= 1
    finally:
        await keeps.close()
        if not doomed.nc.is_closed:
            await doomed.nc.close()


async def test_a_tenants_client_sees_only_its_own(
    cluster: launcher.ClusterInfo, client: Client, tenant: str, tmp_path: Path
) -> None:
    await client.deploy(
        make_function(
            tmp_path / "o", "other", 'runtime = "python"\nhandler = "main:handle"\n', {"main.py": HANDLER}
        ),
        tenant,
    )
    mine = await deploy_as(cluster, create_tenant(cluster, "lister", tmp_path), tmp_path, "mine")
    try:
        assert [(f.spec.tenant, f.spec.name) for f in await mine.functions()] == [("lister", "mine")]
        with pytest.raises(ClientError) as refused:
            await mine.functions(tenant)
        assert refused.value.error.code == "unauthorized"
        assert msgspec.to_builtins((await mine.invoke(tenant, "other")).error)["code"] == "unauthorized"
        for operators_only in (mine.status(), mine.set_tenant("lister", 10_000)):
            with pytest.raises(ClientError) as refused:
                await operators_only
            assert refused.value.error.code == "unauthorized"
    finally:
        await mine.close()


async def test_a_beat_speaks_only_for_the_identity_of_its_subject(
    harness: Connection, client: Client
) -> None:
    """On its own subject (all NATS lets it publish), a node or replica naming another identity
    in the body is ignored: it can neither pose as another node nor add a replica."""
    forged_replica = ReplicaBeat(
        scheduler_id="ghost-replica",
        seq=0,
        running=0,
        queued=0,
        throttled=0,
        etcd_ok=True,
        view_age_ms=0,
        nodes_healthy=2,
    )
    # host-1 speaking for host-2 (host-2's own next beat would replace it within 0.2 s: the
    # status below is asked at once, before it)
    forged_node = Heartbeat(node_id="host-2", seq=0, inflight=0, capacity=64, instances=4242)
    await harness.publish(subjects.replica_beat("scheduler-9"), codec.encode(forged_replica))
    await harness.publish(subjects.heartbeat("host-1"), codec.encode(forged_node))
    await harness.flush()
    status = await client.status()
    assert "ghost-replica" not in {beat.scheduler_id for beat in status.replicas}
    assert all(node.instances != 4242 for node in status.nodes)


async def test_a_tenants_connections_are_bounded_together(
    cluster: launcher.ClusterInfo, tmp_path: Path
) -> None:
    """All of a tenant's connections count against its own account's limit, whichever of its
    credentials opened them; other tenants connect as before."""
    first, second = create_tenant(cluster, "greedy", tmp_path), create_tenant(cluster, "greedy", tmp_path)
    opened = []
    try:
        for i in range(authority.TENANT_MAX_CONNECTIONS):
            creds = first if i % 2 else second
            opened.append(
                await nats.connect(
                    cluster.nats_url,
                    user_credentials=creds,
                    inbox_prefix=subjects.tenant_inbox("greedy"),
                    allow_reconnect=False,
                )
            )
        with pytest.raises(ClientError) as refused:
            await Client.connect(cluster.nats_url, creds=first)
        assert refused.value.error.code == "throttled" and "connections" in refused.value.error.message
        other = await Client.connect(cluster.nats_url, creds=create_tenant(cluster, "modest", tmp_path))
        await other.close()
        await opened.pop().close()
        again = await Client.connect(cluster.nats_url, creds=first)
        await again.close()
    finally:
        for nc in opened:
            await nc.close()
