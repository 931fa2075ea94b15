"""Room on the nodes shared between waiting tenants by weight (scheduler/capacity.py)."""

import asyncio

from scheduler.capacity import CapacityQueue, RecentPeaks, next_tenant, room
from scheduler.waiting import WaitQueue


def test_room_goes_to_the_tenant_with_the_fewest_on_nodes_per_weight() -> None:
    queued = {"flood": 300, "small": 1, "heavy": 2}
    running = {"flood": 364, "small": 3, "heavy": 14}  # on nodes: 64, 2, 12
    weights = {"flood": 1, "small": 1, "heavy": 10}

    assert next_tenant(queued, running, queued.__getitem__, weights.__getitem__) == "heavy"  # 1.2 per weight
    weights["heavy"] = 1
    assert next_tenant(queued, running, queued.__getitem__, weights.__getitem__) == "small"


def test_ties_go_to_the_tenant_that_waited_first_and_woken_lines_are_skipped() -> None:
    queued = {"b": 1, "a": 1, "c": 0}  # c's every waiter is woken already
    running = {"a": 1, "b": 1, "c": 1}

    assert next_tenant(queued, running, queued.__getitem__, lambda _: 1) == "b"
    assert next_tenant({"c": 0}, running, lambda _: 0, lambda _: 1) is None


async def test_a_flood_waiting_first_does_not_keep_a_small_tenant_waiting_behind_it() -> None:
    running = {"flood": 64 + 5, "small": 1}  # admitted, those waiting for room included
    capacity = CapacityQueue(WaitQueue(max_len=100), running, lambda _: 1)
    order: list[str] = []

    async def wait(tenant: str) -> None:
        if await capacity.wait(tenant, 5.0, front=False):
            order.append(tenant)

    waiters = [asyncio.ensure_future(wait("flood")) for _ in range(5)]
    await asyncio.sleep(0)
    waiters.append(asyncio.ensure_future(wait("small")))
    await asyncio.sleep(0)
    assert capacity.waiting() == 6

    capacity.wake()  # one slot frees
    await asyncio.sleep(0)
    assert order == ["small"], "the tenant with nothing on the nodes goes first"
    capacity.wake_all()
    await asyncio.gather(*waiters)
    assert order == ["small"] + ["flood"] * 5 and capacity.waiting() == 0


def test_a_quiet_tenant_keeps_room_for_what_it_ran_lately() -> None:
    shared = room(128, {"victim": 8, "flood": 128}, lambda _: 1)

    assert shared.limit("flood", 1000, 1) == 120, "the flood may not take the victim's 8"
    assert shared.limit("victim", 1000, 1) == 64, "the victim may grow to its share"
    assert shared.limit("victim", 5, 1) == 5, "never past its own limit"


def test_alone_a_tenant_has_its_own_limit_and_a_newcomer_its_share() -> None:
    alone = room(128, {"flood": 128}, lambda _: 1)
    quiet = room(128, {}, lambda _: 1)

    assert quiet.limit("first", 1000, 1) == 1000, "the first after a quiet spell is alone too"

    assert alone.limit("flood", 1000, 1) == 1000
    assert alone.limit("newcomer", 1000, 1) == 64, "a tenant not yet active joins the sharing"


def test_tenants_wanting_more_than_there_is_share_it_by_weight() -> None:
    weights = {"big": 3, "small": 1, "light": 1}
    shared = room(128, {"big": 500, "small": 500, "light": 3}, weights.__getitem__)

    assert shared.allotted == {"light": 3, "big": 93, "small": 32}
    assert shared.limit("big", 1000, 3) == 93 and shared.limit("small", 1000, 1) == 32
    assert shared.limit("light", 1000, 1) == 25, "light may grow to its weighted share"


def test_peaks_cover_one_to_two_windows_then_go() -> None:
    peaks = RecentPeaks(window_s=10)
    peaks.note("a", 5, now=0.0)
    peaks.note("a", 3, now=1.0)
    peaks.note("b", 2, now=11.0)  # the first roll: a's 5 is the window before

    assert peaks.peaks(12.0) == {"a": 5, "b": 2}
    assert peaks.peaks(21.0) == {"b": 2}, "a was quiet for a whole window"
    assert peaks.peaks(45.0) == {}, "after a long quiet spell, nobody"
