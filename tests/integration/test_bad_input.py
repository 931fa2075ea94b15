"""Every kind of bad input gets a structured error naming the problem, and nothing breaks."""

import asyncio
import time
from pathlib import Path

import msgspec
import pytest

from cli.client import Client, ClientError
from deploy import launcher
from fabric.connection import Connection
from schemas import codec, subjects
from schemas.manifest import ManifestError
from schemas.messages import DeployRequest, ErrorReply, FunctionSpec, InvokeRequest, NodeInvoke
from tests.integration.conftest import (
    EXAMPLES,
    IDENTITY,
    host_pid,
    make_function,
    pids_running,
    raw_request,
    wait_gone,
    wait_until,
)

pytestmark = pytest.mark.integration

FAULTY = (
    IDENTITY
    + """
import os, subprocess, time

def handle(payload):
    if payload == b"pid":
        return identity()
    if payload == b"raise":
        raise ValueError("bad payload")
    if payload == b"hang":
        time.sleep(60)
    if payload == b"big":
        return b"x" * (2 * 1024 * 1024)
    if payload == b"exit":
        os._exit(3)
    return "fine"
"""
)


@pytest.fixture
async def faulty(client: Client, tenant: str, tmp_path: Path) -> str:
    fn = make_function(
        tmp_path,
        "faulty",
        'runtime = "python"\nhandler = "main:handle"\ntimeout_ms = 500\n',
        {"main.py": FAULTY},
    )
    await client.deploy(fn, tenant=tenant)
    return tenant


@pytest.mark.parametrize(
    ("subject", "data", "expected"),
    [
        ("hetfaas.invoke.t.f", b"\xc1\xc1 not msgpack", "malformed message"),
        (
            "hetfaas.invoke.t.f",
            msgspec.msgpack.encode({"type": "invoke", "invocation_id": 5}),
            "invocation_id",
        ),
        ("hetfaas.invoke.t.f", msgspec.msgpack.encode([1, 2, 3]), "malformed message"),
        (subjects.control("t", subjects.DEPLOY), b"\x00", "malformed message"),
        (subjects.STATUS, msgspec.msgpack.encode({"type": "deploy"}), "malformed message"),
        (subjects.node_invoke("host-1"), b"garbage", "malformed message"),
    ],
)
async def test_malformed_messages_get_bad_request(
    harness: Connection, client: Client, subject: str, data: bytes, expected: str
) -> None:
    reply = await raw_request(harness, subject, data)
    assert isinstance(reply, ErrorReply) and reply.error.code == "bad_request"
    assert expected in reply.error.message


async def test_subject_must_match_the_body(harness: Connection, client: Client, tenant: str) -> None:
    await client.deploy(EXAMPLES / "hello-python", tenant=tenant)
    request = InvokeRequest(invocation_id="x1", tenant=tenant, function="hello")
    reply = await raw_request(harness, subjects.invoke("other", "hello"), codec.encode(request))
    assert reply.error.code == "bad_request" and "does not match" in reply.error.message


async def test_unknown_function_and_tenant(client: Client, tenant: str) -> None:
    unknown_tenant = await client.invoke("nobody-here", "hello")
    await client.deploy(EXAMPLES / "hello-python", tenant=tenant)
    unknown_function = await client.invoke(tenant, "nope")

    assert (
        unknown_tenant.error.code == "not_found"
        and "unknown tenant 'nobody-here'" in unknown_tenant.error.message
    )
    assert (
        unknown_function.error.code == "not_found"
        and "'nope' is not deployed" in unknown_function.error.message
    )


async def test_names_that_cannot_be_a_subject_are_refused_by_name(client: Client, tenant: str) -> None:
    """A dot, a space or a wildcard in a name would make a subject no scheduler listens on (or
    none at all): the caller hears what is wrong with the name, not that nothing is running."""
    await client.deploy(EXAMPLES / "hello-python", tenant=tenant)
    dotted = await client.invoke(tenant, "hello.world")
    spaced = await client.invoke("two words", "hello")
    wildcard = await client.invoke(tenant, "*")
    still_served = await client.invoke(tenant, "hello", b"Ada")

    assert dotted.error.code == "bad_request" and "function 'hello.world' must match" in dotted.error.message
    assert spaced.error.code == "bad_request" and "tenant 'two words' must match" in spaced.error.message
    assert wildcard.error.code == "bad_request" and "function '*'" in wildcard.error.message
    assert still_served.ok


async def test_payload_over_the_limit(client: Client, tenant: str) -> None:
    await client.deploy(EXAMPLES / "hello-python", tenant=tenant)
    outcome = await client.invoke(tenant, "hello", b"x" * (64 * 1024 + 1))
    assert outcome.error.code == "bad_request" and "over the limit of 65536" in outcome.error.message


async def test_bad_timeout_is_rejected(client: Client, tenant: str) -> None:
    await client.deploy(EXAMPLES / "hello-python", tenant=tenant)
    outcome = await client.invoke(tenant, "hello", timeout_ms=10**9)
    assert outcome.error.code == "bad_request" and "timeout_ms" in outcome.error.message


@pytest.mark.parametrize(
    ("manifest", "problem"),
    [
        ('runtime = "python"\nhandler = "m:f"\ncolour = "red"\n', "unknown key 'colour'"),
        ('runtime = "python"\n', "python functions need handler"),
        ('runtime = "cobol"\n', "Invalid enum value 'cobol'"),
        ('runtime = "exec"\ncommand = []\n', "exec functions need command"),
        ('runtime = "python"\nhandler = "m:f"\ntimeout_ms = 0\n', "timeout_ms = 0 is outside"),
        ("runtime = = 1\n", "not valid TOML"),
    ],
)
async def test_invalid_manifest_is_refused_before_upload(
    client: Client, tmp_path: Path, manifest: str, problem: str
) -> None:
    fn = make_function(tmp_path, "bad", manifest, {})
    with pytest.raises(ManifestError, match=problem):
        await client.deploy(fn)


async def test_scheduler_rechecks_specs_and_bundles(client: Client, tenant: str) -> None:
    bad_spec = FunctionSpec(name="Bad.Name", runtime="python", tenant=tenant)
    good_spec = FunctionSpec(name="ok", runtime="python", tenant=tenant, handler="m:f")
    missing = "sha256-" + "0" * 64

    with pytest.raises(ClientError) as bad:
        await client._control(
            subjects.control(tenant, subjects.DEPLOY),
            DeployRequest(spec=bad_spec, bundle_digest=missing, bundle_size=1),
            codec.deploy_result,
            tenant,
        )
    with pytest.raises(ClientError) as absent:
        await client._control(
            subjects.control(tenant, subjects.DEPLOY),
            DeployRequest(spec=good_spec, bundle_digest=missing, bundle_size=1),
            codec.deploy_result,
            tenant,
        )

    assert bad.value.error.code == "bad_request" and "name 'Bad.Name' must match" in bad.value.error.message
    assert "handler" in bad.value.error.message
    assert absent.value.error.code == "not_found" and "was not uploaded" in absent.value.error.message


async def test_node_rejects_a_digest_that_is_a_path(harness: Connection, client: Client) -> None:
    spec = FunctionSpec(name="x", runtime="python", handler="m:f")
    message = NodeInvoke(
        invocation_id="p1", spec=spec, bundle_digest="../../etc", payload=b"", timeout_ms=1000
    )
    reply = await raw_request(harness, subjects.node_invoke("host-1"), codec.encode(message))
    assert reply.error.code == "internal" and "is not a bundle digest" in reply.error.message


async def test_handler_that_raises(client: Client, faulty: str) -> None:
    failed = await client.invoke(faulty, "faulty", b"raise")
    after = await client.invoke(faulty, "faulty", b"ok")

    assert failed.error.code == "function_error"
    assert "ValueError: bad payload" in failed.error.message and "Traceback" in failed.error.detail
    assert after.ok and after.reply.output == b"fine" and after.reply.cold_start is False


async def test_handler_that_hangs_is_killed_at_its_timeout(client: Client, faulty: str) -> None:
    pid = host_pid((await client.invoke(faulty, "faulty", b"pid")).reply.output.decode())
    started = time.monotonic()
    hung = await client.invoke(faulty, "faulty", b"hang", timeout_ms=10_000)
    elapsed_s = time.monotonic() - started
    after = await client.invoke(faulty, "faulty", b"ok")

    assert hung.error.code == "timeout" and "did not return within" in hung.error.message
    assert elapsed_s < 2.0, "the function's own 500 ms timeout applied, not the caller's 10 s"
    assert await wait_gone(pid), "the hung instance was killed"
    assert after.ok and after.reply.cold_start is True, "a fresh instance replaced the killed one"


async def test_output_over_the_cap_and_a_crashing_instance(client: Client, faulty: str, cluster) -> None:
    big = await client.invoke(faulty, "faulty", b"big")
    crashed = await client.invoke(faulty, "faulty", b"exit")
    after = await client.invoke(faulty, "faulty", b"ok")

    assert big.error.code == "function_error" and "over the node's limit" in big.error.message
    assert crashed.error.code == "function_error" and "died" in crashed.error.message
    assert after.ok
    assert all(launcher.running_processes(cluster).values()), "no service crashed"


async def test_exec_timeout_kills_the_whole_process_group(
    client: Client, tenant: str, tmp_path: Path
) -> None:
    marker = f"hetfaas-sleeper-{tenant}"
    script = "#!/bin/sh\npython3 -c 'import time; time.sleep(60)' \"$1\" &\nwait\n"
    fn = make_function(
        tmp_path,
        "sleeper",
        f'runtime = "exec"\ncommand = ["./run.sh", "{marker}"]\ntimeout_ms = 1000\n',
        {"run.sh": script},
    )
    await client.deploy(fn, tenant=tenant)

    invocation = asyncio.create_task(client.invoke(tenant, "sleeper"))
    started = await wait_until(lambda: bool(pids_running(marker)))
    outcome = await invocation

    assert started, "the command started its background child"
    assert outcome.error.code == "timeout"
    assert await wait_until(lambda: not pids_running(marker)), "the command's background child was killed too"


async def test_exec_failure_reports_status_and_stderr(client: Client, tenant: str, tmp_path: Path) -> None:
    fn = make_function(
        tmp_path,
        "fails",
        'runtime = "exec"\ncommand = ["./run.sh"]\n',
        {"run.sh": "#!/bin/sh\necho 'no such record' >&2\nexit 4\n"},
    )
    missing = make_function(tmp_path, "missing", 'runtime = "exec"\ncommand = ["./nothere"]\n', {})
    await client.deploy(fn, tenant=tenant)
    await client.deploy(missing, tenant=tenant)

    failed = await client.invoke(tenant, "fails")
    absent = await client.invoke(tenant, "missing")

    assert failed.error.code == "function_error" and "status 4" in failed.error.message
    assert "no such record" in failed.error.detail
    assert absent.error.code == "function_error" and "cannot start './nothere'" in absent.error.message


async def test_bad_inputs_leave_other_invocations_unaffected(
    harness: Connection, client: Client, faulty: str
) -> None:
    payloads = [b"raise", b"ok", b"hang", b"ok", b"exit", b"ok"] * 3
    *outcomes, malformed = await asyncio.gather(
        *(client.invoke(faulty, "faulty", p) for p in payloads),
        raw_request(harness, "hetfaas.invoke.a.b", b"\xc1"),
    )
    expected = {b"ok": None, b"raise": "function_error", b"hang": "timeout", b"exit": "function_error"}

    assert [o.error.code if o.error else None for o in outcomes] == [expected[p] for p in payloads]
    assert all(o.reply.output == b"fine" for o in outcomes if o.ok)
    assert malformed.error.code == "bad_request"
    assert all(n.healthy for n in (await client.status()).nodes)


async def test_node_rejects_names_that_would_be_paths(
    harness: Connection, client: Client, tenant: str
) -> None:
    deployed = await client.deploy(EXAMPLES / "hello-python", tenant=tenant)
    spec = FunctionSpec(name="../../../tmp/x", runtime="python", handler="handler:handle", tenant=tenant)
    message = NodeInvoke(
        invocation_id="p2",
        spec=spec,
        bundle_digest=deployed.function.bundle_digest,
        payload=b"",
        timeout_ms=5000,
    )
    reply = await raw_request(harness, subjects.node_invoke("host-1"), codec.encode(message))
    assert reply.error.code == "bad_request" and "invalid tenant or function name" in reply.error.message


async def test_garbage_heartbeats_are_ignored(harness: Connection, client: Client) -> None:
    await harness.publish(subjects.heartbeat("host-1"), b"\xc1 not a heartbeat")
    await harness.publish(
        subjects.heartbeat("ghost"), msgspec.msgpack.encode({"type": "heartbeat", "seq": "x"})
    )
    await harness.flush()
    status = await client.status()
    assert [(n.node_id, n.healthy) for n in status.nodes] == [("host-1", True), ("host-2", True)]
