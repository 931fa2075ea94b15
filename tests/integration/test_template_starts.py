"""Cold starts of a function that ran on a node fork from its template there, end to end: the
start path on replies, `invoke -v` and `coldstarts`; a template killed is replaced, and the
starts go another way meanwhile. One host, so every start of the function is on it."""

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cli.client import Client
from deploy import launcher
from host_node.runtimes.python_template import forks_possible
from tests.integration.conftest import make_function, pids_running, start_cluster, wait_for_nodes
from tests.integration.test_cli import hetfaas

pytestmark = [pytest.mark.integration, pytest.mark.privileged]

# Each call holds its instance this long, so calls sent together need an instance each.
SLOW = "import time\n\ndef handle(payload):\n    time.sleep(1.5)\n    return payload\n"


@pytest.fixture(scope="module")
def one_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[launcher.ClusterInfo]:
    if os.geteuid() != 0:
        pytest.skip("templates fork in the secure sandbox, which needs root")
    if not forks_possible():
        pytest.skip("this kernel has no Landlock ABI 6 (Linux 6.12): nodes start no templates")
    info = start_cluster(tmp_path_factory.mktemp("templates"), hosts=1)
    try:
        asyncio.run(wait_for_nodes(info, 1))
        yield info
    finally:
        launcher.stop(info)


@pytest.fixture
async def client(one_host: launcher.ClusterInfo) -> AsyncIterator[Client]:
    client = await Client.connect(one_host.nats_url, "template-tests", creds=one_host.nats_creds)
    yield client
    await client.close()


async def templates_become(client: Client, count: int) -> None:
    """Until the node's heartbeat says it has `count` live templates."""
    async with asyncio.timeout(20):
        while True:
            if (await client.status()).nodes[0].templates == count:
                return
            await asyncio.sleep(0.05)  # heartbeats come every 0.2 s here: polled


async def inflight_becomes(client: Client, count: int) -> None:
    async with asyncio.timeout(20):
        while True:
            if (await client.status()).nodes[0].inflight >= count:
                return
            await asyncio.sleep(0.02)  # heartbeats come every 0.2 s here: polled


async def together(client: Client, tenant: str, calls: int) -> list[str]:
    """`calls` invocations at once; the start path of each ("" for a warm one)."""
    outcomes = await asyncio.gather(
        *(client.invoke(tenant, "slow", b"x", timeout_ms=20_000) for _ in range(calls))
    )
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    return sorted(o.reply.start_path for o in outcomes)


async def test_later_cold_starts_fork_from_the_functions_template_which_is_replaced_when_killed(
    one_host: launcher.ClusterInfo, client: Client, tmp_path: Path
) -> None:
    tenant = "forks"
    manifest = 'runtime = "python"\nhandler = "slowfork:handle"\nconcurrency = 8\ntimeout_ms = 10000\n'
    await client.deploy(make_function(tmp_path, "slow", manifest, {"slowfork.py": SLOW}), tenant=tenant)

    first = await together(client, tenant, 1)
    assert first[0] in ("stem_cell", "fresh"), first
    await templates_become(client, 1)
    assert await together(client, tenant, 2) == ["", "template_fork"], "one warm, one forked"

    (template,) = templates_of("slowfork:handle")
    os.kill(template, signal.SIGKILL)  # kill -9; its fork, in its pid namespace, dies with it
    await templates_become(client, 0)
    replaced = await together(client, tenant, 2)
    assert replaced[0] == "" and replaced[1] in ("stem_cell", "fresh"), replaced
    await templates_become(client, 1)
    assert await together(client, tenant, 3) == ["", "", "template_fork"], "forking again"

    # Removed while a fork runs a call: the template forks no more, but lets the call finish.
    running = asyncio.ensure_future(together(client, tenant, 4))  # three warm, one forked
    await inflight_becomes(client, 4)
    await client.remove(tenant, "slow")
    assert sorted(await running) == ["", "", "", "template_fork"], "every call it had finished"
    await templates_become(client, 0)

    await client.deploy(
        make_function(tmp_path / "again", "slow", manifest, {"slowfork.py": SLOW}), tenant=tenant
    )
    verbose = hetfaas(one_host.state_dir, "invoke", "slow", "--tenant", tenant, "-v", "--data", "v")
    assert verbose.returncode == 0 and b"cold (" in verbose.stderr, verbose.stderr
    summary = hetfaas(one_host.state_dir, "coldstarts", "--function", "slow", "--json")
    paths = {row["start_path"] for row in json.loads(summary.stdout)}
    assert "template_fork" in paths and paths & {"stem_cell", "fresh"}, paths


def templates_of(handler: str) -> list[int]:
    """Host pids of the handler's templates (its forks have the same command line: they are the
    ones whose parent is one of them)."""
    found = [pid for pid in pids_running(handler) if b"template" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return [pid for pid in found if parent_of(pid) not in found]


def parent_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
