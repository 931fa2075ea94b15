"""The verifier service end to end: `hetfaas verify` and the Client against a real cluster with a
verifier replica, the kernel verifier in its worker, signing, and per-tenant fairness."""

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cli.client import Client, ClientError
from deploy import launcher
from fabric import signing
from schemas.ebpf import VerifyRequest
from tests.bpf_build import COUNTER, bpf_builder
from tests.integration.conftest import metric_value, scrape
from tests.integration.test_tracing import read_spans
from verifier_service import attestation

pytestmark = [pytest.mark.integration, pytest.mark.privileged]

UNCHECKED_PACKET = """
SEC("xdp")
int peek(struct xdp_md *ctx) { unsigned char *data = (void *)(long)ctx->data; return data[20]; }
"""
TAIL_CALL = """
SEC("xdp")
int jumper(struct xdp_md *ctx) { bpf_tail_call(ctx, 0, 0); return XDP_PASS; }
"""


@pytest.fixture(scope="module")
def verifier_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[launcher.ClusterInfo]:
    if os.geteuid() != 0:
        pytest.skip("the verifier loads programs into the kernel: it needs root")
    info = launcher.up(tmp_path_factory.mktemp("verify") / "state", hosts=0, verifiers=1)
    try:
        yield info
    finally:
        launcher.stop(info)


@pytest.fixture(scope="module")
async def vclient(verifier_cluster: launcher.ClusterInfo) -> AsyncIterator[Client]:
    client = await Client.connect(
        verifier_cluster.nats_url, "verify-tests", creds=verifier_cluster.nats_creds
    )
    yield client
    await client.close()


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("objects")
    build = bpf_builder(directory)
    out = {}
    for name, source in {"counter": COUNTER, "peek": UNCHECKED_PACKET, "jumper": TAIL_CALL}.items():
        path = directory / f"{name}.o"
        path.write_bytes(build(name, source))
        out[name] = path
    return out


def hetfaas(info: launcher.ClusterInfo, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HETFAAS_NATS_URL": info.nats_url, "HETFAAS_CREDS": info.nats_creds}
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, env=env, timeout=60)


def test_verify_accepts_a_good_program_and_says_what_it_checked(verifier_cluster, objects) -> None:
    result = hetfaas(verifier_cluster, "verify", str(objects["counter"]), "--json")
    text = hetfaas(verifier_cluster, "verify", str(objects["counter"]))

    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["accepted"] is True and body["reasons"] == [] and body["digest"].startswith("sha256-")
    assert body["verified_insns"] > 0 and body["maps"][0]["name"] == "counters"
    assert b"accepted" in text.stdout and b"XDP_PASS" in text.stdout


def test_verify_explains_a_rejection(verifier_cluster, objects) -> None:
    kernel = hetfaas(verifier_cluster, "verify", str(objects["peek"]), "--json")
    policy = hetfaas(verifier_cluster, "verify", str(objects["jumper"]))

    assert kernel.returncode == 1
    [reason] = json.loads(kernel.stdout)["reasons"]
    assert (
        reason["code"] == "kernel_verifier" and "packet" in reason["message"] and reason["insn"] is not None
    )
    assert policy.returncode == 1 and b"tail_call at instruction" in policy.stdout


def test_the_verifier_counts_its_verdicts(verifier_cluster, objects) -> None:
    before = scrape(verifier_cluster.state_dir, "verifier-0")
    hetfaas(verifier_cluster, "verify", str(objects["counter"]))
    hetfaas(verifier_cluster, "verify", str(objects["peek"]))
    after = scrape(verifier_cluster.state_dir, "verifier-0")

    def grew(series: str) -> float:
        return metric_value(after, series) - metric_value(before, series)

    accepted = 'hetfaas_verifier_verdicts_total{hetfaas_verdict="accepted",hetfaas_reason=""}'
    rejected = 'hetfaas_verifier_verdicts_total{hetfaas_verdict="rejected",hetfaas_reason="kernel_verifier"}'
    assert grew(accepted) == 1 and grew(rejected) == 1
    assert grew('hetfaas_verifier_duration_seconds_count{hetfaas_verdict="accepted"}') == 1


async def test_an_approved_function_comes_back_signed(vclient: Client, verifier_cluster, objects) -> None:
    request = VerifyRequest(tenant="acme", function="count", object=objects["counter"].read_bytes())
    reply = await vclient.verify(request)
    key = attestation.load_or_create_key(Path(verifier_cluster.state_dir) / "keys" / "signing.pem")
    trusted = {signing.key_id(key.public_key()): key.public_key()}

    approved = signing.check(reply.signed, trusted, time.time())

    assert (approved.tenant, approved.function, approved.digest) == ("acme", "count", reply.digest)
    assert approved.verified_insns == reply.verified_insns and approved.maps == reply.maps


async def test_bad_requests_get_structured_errors(vclient: Client, objects) -> None:
    data = objects["counter"].read_bytes()
    for request, words in [
        (VerifyRequest(tenant="../x", function="", object=data), "invalid tenant"),
        (VerifyRequest(tenant="acme", function="", object=data, prog_type="kprobe"), "not offered"),
        (VerifyRequest(tenant="acme", function="", object=b"x" * (600 * 1024)), "over the limit"),
    ]:
        with pytest.raises(ClientError) as refused:
            await vclient.verify(request)
        assert refused.value.error.code == "bad_request" and words in refused.value.error.message


async def test_one_tenants_burst_does_not_hold_up_another_tenant(vclient: Client, objects) -> None:
    data = objects["counter"].read_bytes()

    async def attempt(tenant: str) -> str:
        try:
            await vclient.verify(VerifyRequest(tenant=tenant, function="", object=data))
            return "ok"
        except ClientError as exc:
            return exc.error.code

    burst = [asyncio.create_task(attempt("noisy")) for _ in range(50)]
    await asyncio.sleep(0)  # the burst is on the wire first
    started = time.monotonic()
    quiet = await attempt("quiet")
    quiet_s = time.monotonic() - started
    outcomes = await asyncio.gather(*burst)

    assert quiet == "ok" and quiet_s < 3.0, f"the quiet tenant waited {quiet_s:.2f} s"
    assert outcomes.count("throttled") >= 25 and outcomes.count("ok") >= 10, outcomes


def test_a_verification_is_traced(verifier_cluster, objects) -> None:
    rejected = hetfaas(verifier_cluster, "verify", str(objects["jumper"]), "--tenant", "traced")
    assert rejected.returncode == 1
    deadline = time.monotonic() + 10
    while True:
        spans = read_spans(Path(verifier_cluster.state_dir) / "traces")
        mine = [
            s
            for s in spans
            if s["name"] == "verifier.verify" and s["attrs"].get("hetfaas.tenant") == "traced"
        ]
        if mine:
            break
        assert time.monotonic() < deadline, "the verifier's span did not arrive"
        time.sleep(0.05)
    assert mine[0]["attrs"]["hetfaas.accepted"] is False and mine[0]["service"] == "verifier-0"
