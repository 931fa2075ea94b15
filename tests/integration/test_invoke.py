"""Deploy and invoke through a real cluster: cold then warm, redeploys, concurrency."""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cli.client import Client
from deploy import launcher
from tests.integration.conftest import (
    EXAMPLES,
    HOST_OVERRIDES,
    IDENTITY,
    SCHEDULER_OVERRIDES,
    host_pid,
    make_function,
    wait_gone,
    wait_until,
)

pytestmark = pytest.mark.integration

ECHO = (
    IDENTITY
    + """
def handle(payload):
    return {"echo": payload.decode(), "instance": identity()}
"""
)


async def test_python_function_cold_then_warm(client: Client, tenant: str) -> None:
    deployed = await client.deploy(EXAMPLES / "hello-python", tenant=tenant)
    assert deployed.updated and deployed.function.spec.tenant == tenant

    first = await client.invoke(tenant, "hello", b"Ada", timeout_ms=10_000)
    second = await client.invoke(tenant, "hello", b"Grace", timeout_ms=10_000)

    assert first.ok and second.ok, (first.error, second.error)
    assert first.reply.cold_start is True and "runtime_init_ms" in first.reply.phases_ms
    assert second.reply.cold_start is False and "runtime_init_ms" not in second.reply.phases_ms
    one, two = json.loads(first.reply.output), json.loads(second.reply.output)
    assert one["greeting"] == "hello, Ada!" and two["greeting"] == "hello, Grace!"
    assert second.node == first.node and two["instance"] == one["instance"], "warm call reused the instance"


async def test_exec_function_cold_then_warm(client: Client, tenant: str) -> None:
    await client.deploy(EXAMPLES / "wordcount-exec", tenant=tenant)

    first = await client.invoke(tenant, "wordcount", b"one two three\nfour\n", timeout_ms=10_000)
    second = await client.invoke(tenant, "wordcount", b"x", timeout_ms=10_000)

    assert first.ok and second.ok, (first.error, second.error)
    assert json.loads(first.reply.output) == {"lines": 2, "words": 4, "bytes": 19}
    assert json.loads(second.reply.output) == {"lines": 0, "words": 1, "bytes": 1}
    assert first.reply.cold_start is True and "exec_ms" in first.reply.phases_ms
    assert second.reply.cold_start is False and "exec_ms" in second.reply.phases_ms


async def test_redeploy_runs_the_new_code_in_a_new_instance(client: Client, tenant: str, tmp_path) -> None:
    fn = make_function(
        tmp_path,
        "versioned",
        'runtime = "python"\nhandler = "main:handle"\n',
        {"main.py": "def handle(p):\n    return 'v1'\n"},
    )
    await client.deploy(fn, tenant=tenant)
    assert (await client.invoke(tenant, "versioned")).reply.output == b"v1"
    again = await client.deploy(fn, tenant=tenant)
    assert again.updated is False, "same code and spec: nothing to change"

    (fn / "main.py").write_text("def handle(p):\n    return 'v2'\n")
    redeployed = await client.deploy(fn, tenant=tenant)
    outcome = await client.invoke(tenant, "versioned")

    assert redeployed.updated and redeployed.function.bundle_digest != again.function.bundle_digest
    assert outcome.ok and outcome.reply.output == b"v2" and outcome.reply.cold_start
    assert "bundle_fetch_ms" in outcome.reply.phases_ms, "the node fetched the new code once"


async def test_binary_and_str_and_none_results(client: Client, tenant: str, tmp_path) -> None:
    code = (
        "def raw(p):\n    return bytes(range(256))\n\n"
        "def text(p):\n    return 'é'\n\n"
        "def nothing(p):\n    return None\n"
    )
    for handler in ("raw", "text", "nothing"):
        fn = make_function(
            tmp_path, handler, f'runtime = "python"\nhandler = "main:{handler}"\n', {"main.py": code}
        )
        await client.deploy(fn, tenant=tenant)
    raw, text, nothing = [await client.invoke(tenant, h) for h in ("raw", "text", "nothing")]
    assert raw.reply.output == bytes(range(256))
    assert text.reply.output == "é".encode()
    assert nothing.ok and nothing.reply.output == b""


async def test_100_concurrent_invocations_are_all_answered(client: Client, tenant: str, tmp_path) -> None:
    fn = make_function(
        tmp_path, "echo", 'runtime = "python"\nhandler = "main:handle"\nconcurrency = 8\n', {"main.py": ECHO}
    )
    await client.deploy(fn, tenant=tenant)

    outcomes = await asyncio.gather(
        *(client.invoke(tenant, "echo", f"msg-{i}".encode(), timeout_ms=20_000) for i in range(100))
    )

    assert [o.error for o in outcomes if not o.ok] == []
    assert [json.loads(o.reply.output)["echo"] for o in outcomes] == [f"msg-{i}" for i in range(100)]
    assert len({o.invocation_id for o in outcomes}) == 100
    instances = {json.loads(o.reply.output)["instance"] for o in outcomes}
    assert 1 < len(instances) <= 16, "several instances served the burst, within concurrency 8 per node"


async def test_list_and_status(client: Client, tenant: str) -> None:
    await client.deploy(EXAMPLES / "hello-python", tenant=tenant)
    await client.deploy(EXAMPLES / "wordcount-exec", tenant=tenant)

    names = [(r.spec.tenant, r.spec.name, r.spec.runtime) for r in await client.functions(tenant)]
    status = await client.status()

    assert names == [(tenant, "hello", "python"), (tenant, "wordcount", "exec")]
    assert [n.node_id for n in status.nodes] == ["host-1", "host-2"]
    assert all(n.healthy and n.capacity == 64 for n in status.nodes)
    assert [s.scheduler_id for s in status.schedulers] == ["scheduler-0"]


@contextlib.asynccontextmanager
async def one_host(tmp_path: Path, **host_settings: object) -> AsyncIterator[Client]:
    """A cluster of its own (one host node with these settings), and a client of it."""
    info = launcher.up(
        tmp_path / "state",
        hosts=1,
        host_overrides={**HOST_OVERRIDES, **host_settings},
        scheduler_overrides=SCHEDULER_OVERRIDES,
    )
    try:
        client = await Client.connect(info.nats_url, "one-host-test", creds=info.nats_creds)
        try:
            await client.wait_until_ready(1, timeout_s=30)
            yield client
        finally:
            await client.close()
    finally:
        launcher.stop(info)


async def test_idle_instances_stop_after_their_keep_alive(tmp_path) -> None:
    async with one_host(tmp_path, keep_alive_s=0.5) as client:
        fn = make_function(
            tmp_path, "echo", 'runtime = "python"\nhandler = "main:handle"\n', {"main.py": ECHO}
        )
        await client.deploy(fn)
        first = await client.invoke("default", "echo", b"a")
        instance = json.loads(first.reply.output)["instance"]
        pid = host_pid(instance)
        stopped = await wait_gone(pid, timeout_s=10)
        again = await client.invoke("default", "echo", b"b")

    assert stopped, "the idle instance outlived its keep-alive"
    assert first.reply.cold_start and again.reply.cold_start, "the second call had to start a new instance"
    assert json.loads(again.reply.output)["instance"] != instance


CHATTY = """
def handle(payload):
    print("x" * 3000, flush=True)  # to the function's log
    return payload
"""


async def test_a_chatty_function_s_log_is_rotated_at_its_limit(tmp_path) -> None:
    log = tmp_path / "state" / "data" / "host-1" / "logs" / "default" / "chatty.log"
    async with one_host(tmp_path, max_log_bytes=8000) as client:
        fn = make_function(
            tmp_path, "chatty", 'runtime = "python"\nhandler = "main:handle"\n', {"main.py": CHATTY}
        )
        await client.deploy(fn)
        outcomes = [await client.invoke("default", "chatty", b"a") for _ in range(4)]  # 12 000 bytes
        rotated = await wait_until(lambda: log.with_name("chatty.log.1").exists(), timeout_s=10)
        after = await client.invoke("default", "chatty", b"b")

    assert all(o.ok for o in outcomes) and after.ok
    assert rotated, "the log grew past its limit and stayed there"
    older = log.with_name("chatty.log.1").read_text().splitlines()
    assert older and all(line == "x" * 3000 for line in older), "whole lines, within the limit"
    assert 0 < log.stat().st_size < 8000, "the instance went on writing into the emptied log"
    assert log.read_text().strip("x\n") == "", "whole lines of the function's own output"
