"""Bundles as an adversary writes them: an unpack bomb is refused at deploy and, planted in the
store anyway, on the node, without the node writing it out; junk planted under a bundle's digest
is repaired by the owner's next deploy; a digest that is a path is a bad request."""

import gzip
import io
import shutil
import tarfile
import time
from pathlib import Path

import pytest

from cli.client import Client
from deploy import launcher
from fabric import bundles
from fabric.bundles import BundleStore, digest_of
from fabric.connection import Connection
from schemas import codec, keys, subjects
from schemas.messages import DeployRequest, FunctionRecord, FunctionSpec, UploadBundle
from tests.integration.conftest import EXAMPLES, raw_request

pytestmark = pytest.mark.integration
MIB = 1 << 20


def bomb(members: int = 20, each_bytes: int = 16 * MIB) -> bytes:
    """A small tar.gz of zeros that unpacks to members x each_bytes (320 MiB by default)."""
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        for i in range(members):
            info = tarfile.TarInfo(f"zeros-{i}")
            info.size = each_bytes
            tar.addfile(info, io.BytesIO(bytes(each_bytes)))
    return buf.getvalue()


async def test_an_unpack_bomb_is_refused_at_deploy(harness: Connection, tenant: str) -> None:
    data = bomb()
    assert len(data) < 2 * MIB
    reply = await raw_request(
        harness,
        subjects.control(tenant, subjects.UPLOAD),
        codec.encode(UploadBundle(digest=digest_of(data), data=data)),
    )
    assert reply.error.code == "bad_request"
    assert f"unpacks to more than {bundles.MAX_UNPACKED_BYTES >> 20} MiB" in reply.error.message


async def test_a_bomb_planted_in_the_store_is_refused_by_the_node_unwritten(
    cluster: launcher.ClusterInfo, client: Client, harness: Connection, tenant: str
) -> None:
    data = bomb(members=24)  # 384 MiB of zeros
    digest = await BundleStore(harness.jetstream(), replicas=1).upload(data)  # past the scheduler's check
    spec = FunctionSpec(name="bomb", tenant=tenant, runtime="exec", command=["/bin/true"])
    record = FunctionRecord(spec=spec, bundle_digest=digest, bundle_size=len(data), deployed_at=0)
    async with launcher.operator_store(cluster) as store:
        await store.put(keys.function(tenant, "bomb"), codec.encode(record))
    started = time.monotonic()
    outcome = None
    for _ in range(50):  # until the scheduler's watch has the record
        outcome = await client.invoke(tenant, "bomb", b"")
        if outcome.error is None or outcome.error.code != "not_found":
            break
    assert outcome is not None and outcome.error is not None and outcome.error.code == "internal"
    assert "unpacks to more than" in outcome.error.message
    assert time.monotonic() - started < 10, "the node stopped reading at the header past the bound"
    cache = Path(cluster.state_dir) / "data" / (outcome.node or "host-1") / "bundles"
    written = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    assert written < 64 * MIB, f"{written} bytes in the node's bundle cache"


async def test_junk_under_a_digest_is_repaired_by_a_redeploy(
    client: Client, harness: Connection, tenant: str, tmp_path: Path
) -> None:
    fn = shutil.copytree(EXAMPLES / "hello-python", tmp_path / "hello")
    (fn / "salt.txt").write_text(tenant)  # a bundle of its own, never fetched by a node yet
    deployed = await client.deploy(fn, tenant=tenant)
    digest = deployed.function.bundle_digest
    store = await harness.jetstream().object_store("hetfaas-bundles")
    await store.put(digest, b"junk planted under another bundle's name")
    broken = await client.invoke(tenant, "hello", b"Ada")
    assert broken.error is not None and "hash differently" in broken.error.message

    await client.deploy(fn, tenant=tenant)  # the owner deploys again: the upload repairs it
    fixed = await client.invoke(tenant, "hello", b"Ada")
    assert fixed.ok, fixed.error


async def test_a_digest_that_is_a_path_is_a_bad_request(harness: Connection, tenant: str) -> None:
    spec = FunctionSpec(name="f", tenant=tenant, runtime="python", handler="main:handle")
    body = codec.encode(DeployRequest(spec=spec, bundle_digest="../../etc", bundle_size=1))
    reply = await raw_request(harness, subjects.control(tenant, subjects.DEPLOY), body)
    assert reply.error.code == "bad_request" and "is not a bundle digest" in reply.error.message
