"""Pool accounting, the refill decision, borrowing and back-off: pure logic, table-driven."""

import pytest

from host_node.sandbox.pool import Backoff, PoolSettings, RefillPlanner, SlotPool, choose_shard

SETTINGS = PoolSettings(low_water=4, target=8, idle_ms=50, max_per_s=100)


def test_a_fresh_pool_fills_to_its_target_at_once() -> None:
    planner = RefillPlanner(SETTINGS, now=0.0)
    assert planner.plan(have=0, now=0.0) == 8 and planner.refilling


def test_no_refill_during_a_burst_and_a_refill_after_it() -> None:
    planner = RefillPlanner(SETTINGS, now=0.0)
    planner.plan(have=8, now=0.0)
    planner.demand(10.0)
    during = planner.plan(have=1, now=10.02)
    paused = not planner.refilling
    after = planner.plan(have=1, now=10.06)

    assert during == 0 and paused, "a launch 20 ms ago: the burst is on"
    assert after == 7 and planner.refilling


@pytest.mark.parametrize(
    ("have", "expected"),
    [(3, 5), (4, 0), (7, 0), (8, 0)],  # below the low-water mark a cycle starts; at or above, none
)
def test_refill_starts_below_the_low_water_mark(have: int, expected: int) -> None:
    planner = RefillPlanner(SETTINGS, now=0.0)
    planner.plan(have=8, now=0.0)  # settle the initial fill
    assert planner.plan(have=have, now=100.0) == expected


def test_a_started_cycle_continues_past_the_low_water_mark_to_the_target() -> None:
    planner = RefillPlanner(PoolSettings(low_water=4, target=8, idle_ms=0, max_per_s=2), now=0.0)
    planner.plan(have=8, now=0.0)
    first = planner.plan(have=2, now=100.0)  # tokens refilled to the target over 100 s
    second = planner.plan(have=5, now=101.0)  # above low water, but the cycle goes on

    assert first == 6 and second == 3


def test_refill_is_rate_limited() -> None:
    planner = RefillPlanner(PoolSettings(low_water=10, target=10, idle_ms=0, max_per_s=100), now=0.0)
    planner.plan(have=10, now=0.0)
    assert planner.plan(have=0, now=0.0) == 10  # the bucket starts full
    assert planner.plan(have=0, now=0.05) == 5  # then 100/s: 5 in 50 ms


@pytest.mark.parametrize(
    ("ready", "home", "mode", "expected"),
    [
        ([2, 5], 0, "pool", (0, False)),  # home has one
        ([0, 5], 0, "pool", (1, True)),  # borrow from the neighbour
        ([0, 1, 3], 0, "prewarm", (2, True)),  # the neighbour with the most
        ([0, 2, 2], 1, "pool", (1, False)),
        ([0, 0, 0], 2, "pool", (2, False)),  # none anywhere: home creates one inline
        ([0, 5], 0, "naive", (0, False)),  # naive never pools, never borrows
    ],
)
def test_choose_shard(ready, home, mode, expected) -> None:
    assert choose_shard(ready, home, mode) == expected


def test_slot_pool_is_first_in_first_out_and_adopts_without_reusing_names() -> None:
    pool = SlotPool(shard=1)
    pool.adopt("s1-7")
    pool.add_free(pool.new_name(), recycled=False)

    assert pool.free[-1] == "s1-8", "names continue after the adopted one"
    assert pool.take() == "s1-7" and pool.busy == {"s1-7"}
    pool.add_free("s1-7", recycled=True)
    assert list(pool.free) == ["s1-8", "s1-7"] and pool.recycled == 1 and pool.created == 1


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(max_s=1.0)
    delays = [backoff.failed(now=0.0) for _ in range(6)]

    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert not backoff.ready(0.5) and backoff.ready(1.0)
    backoff.succeeded()
    assert backoff.ready(0.0) and backoff.failures == 0
