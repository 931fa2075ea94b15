"""Replica shares, concurrency limits, the wait queue and the keep-alive policy: pure cores."""

import asyncio

import pytest

from scheduler import keepalive, shares
from scheduler.admission import Blocked, Running
from scheduler.settings import KeepAliveSettings
from scheduler.waiting import QueueFull, WaitQueue

# --- shares -------------------------------------------------------------------------------------


@pytest.mark.parametrize("total", [0, 1, 2, 3, 7, 64, 1000])
@pytest.mark.parametrize("replicas", [1, 2, 3, 5])
@pytest.mark.parametrize("offset", [0, 1, 4, 2**31 + 7])
def test_shares_add_up_to_the_limit_exactly(total: int, replicas: int, offset: int) -> None:
    parts = [shares.share(total, rank, replicas, offset) for rank in range(replicas)]
    assert sum(parts) == total
    assert max(parts) - min(parts) <= 1


def test_small_limits_land_on_different_replicas_per_name() -> None:
    holders = {
        next(r for r in range(3) if shares.share(1, r, 3, shares.offset_of(f"fn{i}"))) for i in range(30)
    }
    assert holders == {0, 1, 2}


@pytest.mark.parametrize(
    ("beats", "now", "expected"),
    [
        ({}, 10.0, ("me",)),
        ({"a": 9.5, "z": 9.0}, 10.0, ("a", "me", "z")),
        ({"a": 5.0, "z": 9.0}, 10.0, ("me", "z")),  # a stopped beating
        ({"me": 1.0}, 10.0, ("me",)),  # itself, however late its own beat
    ],
)
def test_live_replicas(beats: dict[str, float], now: float, expected: tuple[str, ...]) -> None:
    assert shares.live_replicas("me", beats, now, stale_after_s=3.0).ids == expected


def test_a_replica_without_a_share_names_a_live_one_with_it() -> None:
    beating = frozenset({"a", "b"})
    holder = next(r for r in "ab" if shares.Replicas(("a", "b"), r, beating).share(1, "acme/fn"))
    other = "b" if holder == "a" else "a"
    without = shares.Replicas(("a", "b"), other, beating)
    assert without.share(1, "acme/fn") == 0 and without.owner(1, "acme/fn") == holder
    only_registered = shares.Replicas(("a", "b"), other, frozenset({other}))
    assert only_registered.owner(1, "acme/fn") is None, "a holder not beating is not handed work"


async def test_a_newcomer_queues_behind_a_waiter_instead_of_taking_its_slot() -> None:
    """FIFO per limit: the waiter woken for a freed slot gets it."""
    queue = WaitQueue(max_len=4)
    first = asyncio.create_task(queue.wait(("function", "f"), 5.0))
    await asyncio.sleep(0)
    assert queue.waiting(("function", "f")) == 1 and queue.waiting(("function", "g")) == 0
    queue.wake(("function", "f"))
    assert await first
    front = asyncio.create_task(queue.wait("r", 5.0))
    back = asyncio.create_task(queue.wait("r", 5.0))
    await asyncio.sleep(0)
    again = asyncio.create_task(queue.wait("r", 5.0, front=True))  # woken before, beaten to it
    await asyncio.sleep(0)
    queue.wake("r")
    await asyncio.sleep(0)
    assert again.done() and not front.done() and not back.done()
    queue.wake_all("r")
    await asyncio.gather(front, back)


# --- limits -------------------------------------------------------------------------------------

FN = ("acme", "fn")


@pytest.mark.parametrize(
    ("running", "fn_limit", "tenant_limit", "expected"),
    [
        ([], None, 10, None),
        ([FN] * 2, 2, 10, Blocked("function", "acme/fn", 2)),
        ([FN] * 2, None, 10, None),  # no function limit: only the tenant's
        ([FN, ("acme", "other")], 5, 2, Blocked("tenant", "acme", 2)),
        ([("other", "fn")] * 5, 5, 2, None),  # another tenant's load does not count
    ],
)
def test_limits(running: list, fn_limit: int | None, tenant_limit: int, expected: Blocked | None) -> None:
    counts = Running()
    for fn in running:
        counts.enter(fn)
    assert counts.blocked(FN, fn_limit, tenant_limit) == expected


def test_leaving_frees_both_counts() -> None:
    counts = Running()
    counts.enter(FN)
    counts.enter(FN)
    counts.leave(FN)
    counts.leave(FN)
    assert counts.total == 0 and not counts.functions and not counts.tenants


def test_blocked_says_which_limit() -> None:
    assert "function acme/fn is at its concurrency limit (2" in Blocked("function", "acme/fn", 2).describe()
    assert "tenant 'acme'" in Blocked("tenant", "acme", 9).describe()


# --- the wait queue -----------------------------------------------------------------------------


async def test_a_freed_slot_wakes_the_longest_waiter_for_it() -> None:
    queue = WaitQueue(max_len=10)
    order: list[str] = []

    async def waiter(name: str, reason: str) -> None:
        if await queue.wait(reason, 5.0):
            order.append(name)

    tasks = [asyncio.create_task(waiter(n, r)) for n, r in [("first", "f"), ("second", "f"), ("other", "g")]]
    await asyncio.sleep(0)
    assert queue.length == 3
    queue.wake("f")
    await asyncio.sleep(0)
    assert order == ["first"]
    queue.wake_all("f")
    queue.wake("g")
    await asyncio.gather(*tasks)
    assert order == ["first", "second", "other"] and queue.length == 0


async def test_a_waiter_woken_from_an_old_queue_leaves_newer_waiters_queued() -> None:
    """Regression: a woken waiter cleaning up late dropped the reason's current queue even when
    it held newer waiters, who then slept until their deadline (found under load in CI)."""
    queue = WaitQueue(max_len=10)
    woken = asyncio.create_task(queue.wait("r", 5.0))
    gone = asyncio.create_task(queue.wait("r", 5.0))
    await asyncio.sleep(0)
    gone.cancel()  # its cleanup runs first: the old queue, empty, goes
    newer = asyncio.create_task(queue.wait("r", 5.0))  # then this one starts a new queue
    queue.wake("r")  # and `woken`, woken from the old queue, cleans up last
    assert await woken
    assert queue.waiting("r") == 1, "the newer waiter is still queued"
    queue.wake("r")
    assert await asyncio.wait_for(newer, 1.0)


async def test_the_queue_is_bounded_and_waits_are_timed() -> None:
    queue = WaitQueue(max_len=1)
    first = asyncio.create_task(queue.wait("f", 0.05))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        await queue.wait("f", 1.0)
    assert await first is False  # nobody woke it: timed out
    assert await queue.wait("f", 0) is False and queue.length == 0


# --- keep-alive ---------------------------------------------------------------------------------

SETTINGS = KeepAliveSettings(bin_s=60.0, range_s=4 * 3600.0, min_samples=10)


def arrivals_every(gaps: list[float]) -> keepalive.Arrivals:
    arrivals = keepalive.Arrivals(SETTINGS)
    now = 1_000.0
    arrivals.record(now)
    for gap in gaps:
        now += gap
        arrivals.record(now)
    return arrivals


def test_a_regular_function_is_unloaded_and_prewarmed_just_in_time() -> None:
    policy = keepalive.policy(arrivals_every([30 * 60.0] * 40).bins, 0, SETTINGS)
    assert policy.source == "histogram"
    assert policy.prewarm_after_s == pytest.approx(30 * 60 * 0.9)  # head bin's start, less 10%
    assert policy.prewarm_after_s + policy.keep_alive_s == pytest.approx(31 * 60 * 1.1)  # tail bin's end


def test_a_frequent_function_stays_loaded() -> None:
    policy = arrivals_every([5.0] * 40).current
    assert policy.prewarm_after_s == 0 and policy.keep_alive_s == pytest.approx(66.0)


def test_a_busy_function_recomputes_its_policy_at_most_once_a_second() -> None:
    """Thousands of calls a second must not recompute an O(bins) policy hundreds of times a
    second: the histogram's bins are a minute wide, the policy cannot move faster."""
    arrivals = arrivals_every([30 * 60.0] * 40)  # a timer: unloaded between calls
    assert arrivals.current.prewarm_after_s > 0
    now = arrivals.last or 0.0
    for _ in range(200):  # a burst: 200 calls in 0.2 s
        now += 0.001
        arrivals.record(now)
    assert arrivals.current.prewarm_after_s > 0, "the burst has not been looked at yet"
    for _ in range(keepalive.RECOMPUTE_EVERY):
        now += 0.1
        arrivals.record(now)
    assert arrivals.current.prewarm_after_s == 0, "a second on, the burst keeps it loaded"


@pytest.mark.parametrize(
    ("gaps", "why"),
    [
        ([60.0] * 5, "too few arrivals yet"),
        ([5 * 3600.0] * 20, "arrivals mostly further apart than the histogram's range"),
        ([60.0 * i for i in range(1, 240)], "no pattern: arrivals spread evenly"),
    ],
)
def test_the_node_default_applies_without_a_pattern(gaps: list[float], why: str) -> None:
    arrivals = arrivals_every(gaps)
    policy = keepalive.policy(arrivals.bins, arrivals.out_of_bounds, SETTINGS)
    assert (policy.prewarm_after_s, policy.keep_alive_s, policy.source) == (0.0, 0.0, why)
    assert policy.as_ms() == (0, 0)


def test_the_policy_follows_a_change_of_pattern() -> None:
    arrivals = arrivals_every([10.0] * 30)
    assert arrivals.current.prewarm_after_s == 0
    for _ in range(2000):
        arrivals.record(arrivals.last + 1800.0)  # now every half hour: the old gaps fade away
    assert arrivals.current.prewarm_after_s == pytest.approx(1800 * 0.9)
    assert arrivals.samples <= SETTINGS.max_samples
