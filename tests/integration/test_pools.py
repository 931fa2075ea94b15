"""The sharded cgroup pools, driven through the node's spawner against the real kernel: refill,
recycling, borrowing, the empty-shard fallback, crash adoption, vanished slots, cleanup."""

import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from host_node.sandbox import cgroups
from host_node.sandbox.agent import SandboxProcess, ShardedSpawner
from host_node.sandbox.cgroups import Limits
from host_node.sandbox.pool import PoolSettings
from host_node.sandbox.settings import SandboxSettings
from tests.integration.conftest import cgroup_dirs_named, process_gone, wait_until

pytestmark = pytest.mark.privileged

LIMITS = Limits(memory_mb=64, cpu_millis=500, pids_max=32)
NO_REFILL_MS = 600_000.0  # refills wait for a quiet period longer than any test


@pytest.fixture
def parent(tmp_path: Path) -> str:
    if os.geteuid() != 0:
        pytest.skip("sandboxes need root (cgroups, namespaces)")
    name = f"hetfaas-pooltest-{os.getpid()}-{tmp_path.name[-12:]}"
    yield name
    cgroups.remove_tree(name)


@pytest.fixture
def code_dir(tmp_path: Path) -> Path:
    code = tmp_path / "code"
    code.mkdir()
    code.chmod(0o755)
    return code


def settings(parent: str, mode: str = "pool", shards: int = 1, **pool) -> SandboxSettings:
    return SandboxSettings(mode=mode, shards=shards, cgroup_parent=parent, pool=PoolSettings(**pool))


async def opened(spawner: ShardedSpawner) -> ShardedSpawner:
    await spawner.open()
    return spawner


@pytest.fixture
async def spawners(tmp_path: Path) -> AsyncIterator[list[ShardedSpawner]]:
    """Spawners a test opens; closed (and their slots removed) at the end."""
    made: list[ShardedSpawner] = []
    yield made
    for spawner in made:
        await spawner.close()
        spawner.remove_all_slots()


async def start(spawner: ShardedSpawner, code_dir: Path, *argv: str) -> SandboxProcess:
    null = os.open(os.devnull, os.O_RDWR)
    try:
        return await spawner.start(list(argv), code_dir, LIMITS, [null, null, null])
    finally:
        os.close(null)


async def test_pool_refills_to_its_target_and_recycles_slots(parent, code_dir, tmp_path, spawners) -> None:
    spawner = await opened(
        ShardedSpawner(settings(parent, low_water=3, target=5, idle_ms=10), "n1", tmp_path)
    )
    spawners.append(spawner)
    [filled] = await spawner.wait_for_states(lambda s: s[0].free == 5 and not s[0].refilling)

    process = await start(spawner, code_dir, "/bin/true")
    status = await process.exited
    [after] = await spawner.wait_for_states(lambda s: s[0].recycled == 1 and s[0].recycling == 0)

    assert filled.created == 5 and filled.inline == 0
    assert status == 0 and process.phases and process.phases.slot_reused
    assert after.free == 5 and after.created == 5, "the slot went back to the pool; none was created"
    assert process.slot in os.listdir(spawner.layout.v2_root or spawner.layout.v1_roots["memory"])


async def test_refill_waits_for_the_burst_to_end(parent, code_dir, tmp_path, spawners) -> None:
    spawner = await opened(
        ShardedSpawner(settings(parent, low_water=2, target=3, idle_ms=NO_REFILL_MS), "n1", tmp_path)
    )
    spawners.append(spawner)
    await spawner.wait_for_states(lambda s: s[0].free == 3)
    sleepers = [await start(spawner, code_dir, "/bin/sleep", "60") for _ in range(3)]
    [drained] = await spawner.wait_for_states(lambda s: s[0].busy == 3)

    assert drained.free == 0 and not drained.refilling, "no refill while launches keep coming"
    for process in sleepers:
        process.kill()
    assert [await p.exited for p in sleepers] == [-signal.SIGKILL] * 3


async def test_an_empty_shard_creates_a_slot_inline(parent, code_dir, tmp_path, spawners) -> None:
    spawner = await opened(
        ShardedSpawner(settings(parent, low_water=1, target=1, idle_ms=NO_REFILL_MS), "n1", tmp_path)
    )
    spawners.append(spawner)
    await spawner.wait_for_states(lambda s: s[0].free == 1)
    first = await start(spawner, code_dir, "/bin/sleep", "60")
    second = await start(spawner, code_dir, "/bin/true")
    await second.exited
    [state] = await spawner.wait_for_states(lambda s: s[0].inline == 1)
    first.kill()

    assert first.phases and first.phases.slot_reused
    assert second.phases and not second.phases.slot_reused, "the pool was empty: a fresh slot"
    assert state.created == 2


async def test_an_empty_home_shard_borrows_from_a_neighbour(parent, code_dir, tmp_path, spawners) -> None:
    spawner = await opened(
        ShardedSpawner(
            settings(parent, shards=2, low_water=2, target=2, idle_ms=NO_REFILL_MS), "n1", tmp_path
        )
    )
    spawners.append(spawner)
    await spawner.wait_for_states(lambda s: len(s) == 2 and all(x.free == 2 for x in s))
    # Homes go round-robin: 0, 1, 0, 1, 0. Shard 1's launches end (their slots come back to it);
    # shard 0's keep running, so its third launch finds shard 0 empty and shard 1 with room.
    long_a = await start(spawner, code_dir, "/bin/sleep", "60")
    await (await start(spawner, code_dir, "/bin/true")).exited
    long_b = await start(spawner, code_dir, "/bin/sleep", "60")
    await (await start(spawner, code_dir, "/bin/true")).exited
    await spawner.wait_for_states(lambda s: s[0].busy == 2 and s[1].recycled == 2 and s[1].free == 2)
    borrowed = await start(spawner, code_dir, "/bin/true")
    await borrowed.exited
    for process in (long_a, long_b):
        process.kill()

    assert (long_a.shard, long_b.shard) == (0, 0)
    assert (
        borrowed.shard == 1 and borrowed.phases and borrowed.phases.borrowed and borrowed.phases.slot_reused
    )


async def test_a_vanished_slot_is_replaced_not_used(parent, code_dir, tmp_path, spawners) -> None:
    spawner = await opened(
        ShardedSpawner(settings(parent, low_water=2, target=2, idle_ms=NO_REFILL_MS), "n1", tmp_path)
    )
    spawners.append(spawner)
    await spawner.wait_for_states(lambda s: s[0].free == 2)
    spawner.layout.slot("s0-1").remove()  # another cgroup manager pruned an empty cgroup of ours

    process = await start(spawner, code_dir, "/bin/true")
    status = await process.exited
    [state] = await spawner.wait_for_states(lambda s: s[0].vanished == 1)

    assert status == 0 and process.slot == "s0-2"
    assert state.vanished == 1


async def test_a_restarted_node_adopts_its_leftover_slots(parent, code_dir, tmp_path, spawners) -> None:
    first = await opened(ShardedSpawner(settings(parent, low_water=3, target=3, idle_ms=10), "n1", tmp_path))
    await first.wait_for_states(lambda s: s[0].free == 3)
    survivor = await start(first, code_dir, "/bin/sleep", "60")
    leftover = set(cgroups.list_slots(first.layout))
    first.abandon()  # the whole node crashes: nobody restarts its shards
    for link in first.shards:  # ... which die without cleaning up
        link.proc.kill()
        await link.proc.wait()
    orphan_alive = not process_gone(survivor.pid)

    second = await opened(ShardedSpawner(settings(parent, low_water=3, target=3, idle_ms=10), "n1", tmp_path))
    spawners.append(second)
    [state] = await second.wait_for_states(lambda s: s[0].free >= 3)

    assert orphan_alive, "the sandbox outlived its shard (it is no child of the node)"
    assert await wait_until(lambda: process_gone(survivor.pid)), "adoption killed what ran in the slot"
    assert state.free == len(leftover) and state.created == 0, "every leftover slot adopted, none made"
    process = await start(second, code_dir, "/bin/true")
    assert await process.exited == 0 and process.slot in leftover


async def test_removing_the_tree_leaves_no_cgroup_behind(parent, code_dir, tmp_path) -> None:
    spawner = await opened(
        ShardedSpawner(settings(parent, mode="prewarm", low_water=2, target=2), "n1", tmp_path)
    )
    await spawner.wait_for_states(lambda s: s[0].prewarmed == 2)
    running = await start(spawner, code_dir, "/bin/sleep", "60")
    for link in spawner.shards:
        link.proc.kill()
        await link.proc.wait()

    removed = cgroups.remove_tree(parent)

    assert removed > 0
    assert await wait_until(lambda: process_gone(running.pid))
    assert cgroup_dirs_named(parent) == []


async def test_prewarmed_sandboxes_start_without_setup(parent, code_dir, tmp_path, spawners) -> None:
    spawner = await opened(
        ShardedSpawner(settings(parent, mode="prewarm", low_water=2, target=2), "n1", tmp_path)
    )
    spawners.append(spawner)
    await spawner.wait_for_states(lambda s: s[0].prewarmed == 2)
    (code_dir / "run.sh").write_text("#!/bin/sh\nexit 7\n")
    (code_dir / "run.sh").chmod(0o755)

    process = await start(spawner, code_dir, "./run.sh")

    assert await process.exited == 7
    assert process.phases and process.phases.prewarmed


def test_the_host_offers_what_sandboxes_need() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    assert shutil.which("nsenter"), "util-linux"
    layout = cgroups.detect_layout("", "probe")
    assert layout.kind in ("v2", "hybrid")


async def test_a_crashed_shard_is_restarted_and_launches_go_on(parent, code_dir, tmp_path, spawners) -> None:
    spawner = await opened(
        ShardedSpawner(settings(parent, low_water=2, target=2, idle_ms=10), "n1", tmp_path)
    )
    spawners.append(spawner)
    await spawner.wait_for_states(lambda s: s[0].free == 2)
    running = await start(spawner, code_dir, "/bin/sleep", "60")
    crashed = spawner.shards[0].proc
    crashed.kill()  # the shard spawner dies; the agent starts a new one, which adopts the slots

    lost = await running.exited
    restarted = await wait_until(lambda: spawner.shards[0].proc is not crashed and spawner.shards[0].state)
    after = await start(spawner, code_dir, "/bin/true")

    assert restarted, "the agent started the shard again"
    assert lost == -signal.SIGKILL, "what ran under the dead shard is reported gone"
    assert await wait_until(lambda: process_gone(running.pid)), "and it is gone: adoption killed it"
    assert await after.exited == 0
