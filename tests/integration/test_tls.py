"""A cluster whose NATS and etcd links are TLS (`hetfaas up --tls`): its CA and certificate are
made by the launcher, every service and the CLI check the servers against that CA, and a client
speaking plain TCP or trusting another CA gets nowhere."""

import asyncio
import json
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import pytest

from cli.client import Client, ClientError
from deploy import launcher
from fabric.store import STORE_ERRORS, Store
from schemas import keys
from tests.integration.conftest import EXAMPLES, HOST_OVERRIDES, SCHEDULER_OVERRIDES, wait_for_nodes
from tests.integration.test_cli import hetfaas

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[launcher.ClusterInfo]:
    info = launcher.up(
        tmp_path_factory.mktemp("tls"),
        hosts=1,
        host_overrides=HOST_OVERRIDES,
        scheduler_overrides=SCHEDULER_OVERRIDES,
        use_tls=True,
    )
    try:
        asyncio.run(wait_for_nodes(info, 1))
        yield info
    finally:
        launcher.stop(info)


def test_the_cli_works_over_tls_with_the_ca_from_cluster_json(tls_cluster: launcher.ClusterInfo) -> None:
    recorded = json.loads((Path(tls_cluster.state_dir) / launcher.CLUSTER_FILE).read_text())
    assert recorded["nats_url"].startswith("tls://") and recorded["nats_ca"] == tls_cluster.nats_ca
    assert Path(tls_cluster.nats_ca).read_text().startswith("-----BEGIN CERTIFICATE-----")
    key = Path(tls_cluster.nats_ca).with_name("server.key")
    assert key.stat().st_mode & 0o777 == 0o600

    deployed = hetfaas(tls_cluster.state_dir, "deploy", str(EXAMPLES / "hello-python"), "--tenant", "tls")
    invoked = hetfaas(tls_cluster.state_dir, "invoke", "hello", "--tenant", "tls", "--data", "Ada", "--json")
    assert deployed.returncode == 0, deployed.stderr
    assert invoked.returncode == 0, invoked.stderr
    assert "Ada" in json.loads(invoked.stdout)["output"]
    with pytest.raises(OSError):  # etcd's TLS port answers plain HTTP with nothing usable
        urllib.request.urlopen(f"http://{tls_cluster.etcd_endpoint}/health", timeout=2).read()


async def test_plain_tcp_and_other_cas_are_refused(tls_cluster: launcher.ClusterInfo, tmp_path: Path) -> None:
    plain = tls_cluster.nats_url.replace("tls://", "nats://")
    with pytest.raises((nats.errors.Error, OSError, ssl.SSLError)):
        await nats.connect(
            plain, user_credentials=tls_cluster.nats_creds, allow_reconnect=False, connect_timeout=2
        )
    # the system's CAs do not vouch for the cluster's certificate
    with pytest.raises((nats.errors.Error, OSError, ssl.SSLError)):
        await Client.connect(tls_cluster.nats_url, creds=tls_cluster.nats_creds)
    with pytest.raises(ClientError, match="cannot use CA certificate"):
        await Client.connect(
            tls_cluster.nats_url, creds=tls_cluster.nats_creds, ca=str(tmp_path / "none.pem")
        )

    async with Store([tls_cluster.etcd_endpoint], timeout_s=2) as plain_store:
        with pytest.raises(STORE_ERRORS):
            await plain_store.get(keys.NODES)
    async with launcher.operator_store(tls_cluster) as store:
        entries, _ = await store.list_prefix(keys.NODES)
        assert [e.key for e in entries] == [keys.node("host-1")], "over TLS, with the CA, etcd answers"
