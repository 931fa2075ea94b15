"""Removing a function (`hetfaas rm`): it stops being served, its instances stop, nothing else
changes."""

import asyncio
import json

import pytest

from cli.client import Client, ClientError
from fabric.connection import Connection
from schemas import subjects
from tests.integration.conftest import IDENTITY, host_pid, make_function, pids_of, wait_gone, wait_until

pytestmark = pytest.mark.integration

MANIFEST = 'runtime = "python"\nhandler = "main:handle"\n'
ECHO = IDENTITY + "\ndef handle(payload):\n    return {'instance': identity()}\n"
# Runs long enough for the function to be removed under it.
SLOW = (
    IDENTITY
    + "\nimport time\n\ndef handle(payload):\n    time.sleep(2)\n    return {'instance': identity()}\n"
)


async def test_a_removed_function_is_no_longer_served_and_its_idle_instance_stops(
    client: Client, tenant: str, tmp_path
) -> None:
    await client.deploy(make_function(tmp_path, "gone", MANIFEST, {"main.py": ECHO}), tenant=tenant)
    await client.deploy(make_function(tmp_path, "kept", MANIFEST, {"main.py": ECHO}), tenant=tenant)
    first = await client.invoke(tenant, "gone", b"")
    kept = await client.invoke(tenant, "kept", b"")
    assert first.ok and kept.ok, (first.error, kept.error)
    instance, kept_instance = (host_pid(json.loads(o.reply.output)["instance"]) for o in (first, kept))

    removed = await client.remove(tenant, "gone")
    after = await client.invoke(tenant, "gone", b"")
    listed = [record.spec.name for record in await client.functions(tenant)]
    stopped = await wait_gone(instance, timeout_s=5)  # its keep-alive here is 30 s
    kept_again = await client.invoke(tenant, "kept", b"")
    with pytest.raises(ClientError) as twice:
        await client.remove(tenant, "gone")

    assert removed.function.spec.name == "gone" and removed.function.spec.tenant == tenant
    assert after.error.code == "not_found" and "'gone' is not deployed" in after.error.message
    assert listed == ["kept"]
    assert stopped, "the removed function's idle instance outlived its removal"
    assert kept_again.ok and host_pid(json.loads(kept_again.reply.output)["instance"]) == kept_instance
    assert twice.value.error.code == "not_found"


async def test_an_invocation_running_at_removal_finishes_then_its_instance_stops(
    client: Client, harness: Connection, tenant: str, tmp_path
) -> None:
    await client.deploy(make_function(tmp_path, "slow", MANIFEST, {"main.py": SLOW}), tenant=tenant)
    await client.deploy(make_function(tmp_path, "kept", MANIFEST, {"main.py": ECHO}), tenant=tenant)
    forwarded = asyncio.Event()  # the scheduler sent it to a node, before the removal's notice
    watch = await harness.subscribe_inline(subjects.node_invoke("*"), lambda *_: forwarded.set())
    running = asyncio.create_task(client.invoke(tenant, "slow", b"", timeout_ms=20_000))
    await forwarded.wait()
    await watch.unsubscribe()
    await client.remove(tenant, "slow")
    answered = await running  # longer than the client waits before sending a copy (2 s)
    kept = await client.invoke(tenant, "kept", b"")

    assert answered.ok, answered.error
    assert kept.ok, kept.error
    removed_instance = json.loads(answered.reply.output)["instance"]
    assert await wait_until(lambda: not pids_of(removed_instance)), "it went back to idle"
    # the same lookup finds the instance of a function still deployed, idle for its keep-alive
    assert len(pids_of(json.loads(kept.reply.output)["instance"])) == 1


async def test_removing_checks_the_name_and_the_function(client: Client, tenant: str) -> None:
    with pytest.raises(ClientError) as invalid:
        await client.remove(tenant, "not a name")
    with pytest.raises(ClientError) as unknown:
        await client.remove(tenant, "never-deployed")

    assert (
        invalid.value.error.code == "bad_request" and "'not a name' must match" in invalid.value.error.message
    )
    assert unknown.value.error.code == "not_found" and "'never-deployed'" in unknown.value.error.message


async def test_an_invocation_queued_at_removal_is_answered_not_found_not_run(
    client: Client, harness: Connection, tenant: str, tmp_path
) -> None:
    """One at a time (max_concurrency = 1): the second waits in the scheduler's queue while the
    first runs, and the function is removed meanwhile."""
    manifest = MANIFEST + "max_concurrency = 1\ntimeout_ms = 10000\n"
    slower = SLOW.replace("time.sleep(2)", "time.sleep(4)")  # past a replica beat or two (queued)
    await client.deploy(make_function(tmp_path, "single", manifest, {"main.py": slower}), tenant=tenant)
    forwarded: list[bytes] = []
    watch = await harness.subscribe_inline(subjects.node_invoke("*"), lambda *a: forwarded.append(a))
    running = asyncio.create_task(client.invoke(tenant, "single", b"", timeout_ms=20_000))
    assert await wait_until(lambda: len(forwarded) == 1)
    queued = asyncio.create_task(client.invoke(tenant, "single", b"", timeout_ms=20_000, retry_after_ms=0))

    async def waiting() -> bool:
        return sum(beat.queued for beat in (await client.status()).replicas) == 1

    deadline = asyncio.get_running_loop().time() + 3.5
    while not await waiting():
        assert asyncio.get_running_loop().time() < deadline, "the second invocation never queued"
    await client.remove(tenant, "single")
    first, second = await running, await queued
    await watch.unsubscribe()

    assert first.ok, first.error
    assert second.error is not None and second.error.code == "not_found", second
    assert "removed while the invocation waited" in second.error.message
    assert len(forwarded) == 1, "the queued invocation was never sent to a node"
