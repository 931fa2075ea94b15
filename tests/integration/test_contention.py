"""One tenant's flood does not starve another: without limits of their own, a tenant holds at
most half the nodes' slots, so another's short calls keep their success rate, most of their
throughput and their p99 while 200 long calls of the first (more than the nodes hold) wait their turn."""

from pathlib import Path

import pytest

from bench.contention import deploy, flooded, victim_calls
from cli.client import Client

pytestmark = pytest.mark.integration


async def test_a_flood_of_long_calls_leaves_another_tenant_its_share(
    client: Client, tmp_path: Path, tenant: str
) -> None:
    victim, flood = f"{tenant}v", f"{tenant}f"
    await deploy(client, tmp_path, victim, flood)
    await victim_calls(client, victim, 0.5)  # its instances started
    alone = await victim_calls(client, victim, 3.0)
    # the victim measured while the flood's calls sleep (started: their sandboxes' starts share
    # the machine's 2 CPUs with the victim, which no scheduling changes)
    crowded = await flooded(client, victim, flood, calls=200, hold_s=5.0, seconds=3.0, settle=True)

    assert crowded.success == 1.0, crowded.line()
    assert crowded.calls >= alone.calls / 2, f"alone {alone.line()}; flooded {crowded.line()}"
    assert crowded.p99_ms <= 2 * alone.p99_ms, f"alone {alone.line()}; flooded {crowded.line()}"


async def test_tenants_whose_own_limits_exceed_the_cluster_share_its_room(
    client: Client, tmp_path: Path, tenant: str
) -> None:
    """Both tenants may run 1000 at once, far more than the nodes hold: the flood's calls beyond
    the nodes' room wait in its own line, and room that frees goes to the tenant with fewer on
    the nodes, so the victim's calls do not queue behind the flood's."""
    victim, flood = f"{tenant}v", f"{tenant}f"
    await deploy(client, tmp_path, victim, flood)
    for name in (victim, flood):
        await client.set_tenant(name, 1000)
    await victim_calls(client, victim, 0.5)
    alone = await victim_calls(client, victim, 3.0)
    crowded = await flooded(client, victim, flood, calls=200, hold_s=5.0, seconds=3.0, settle=True)

    assert crowded.success == 1.0, crowded.line()
    assert crowded.calls >= alone.calls / 2, f"alone {alone.line()}; flooded {crowded.line()}"
    assert crowded.p99_ms <= 2 * alone.p99_ms, f"alone {alone.line()}; flooded {crowded.line()}"
