"""Deadlines in slots: each key fires once, not before its time, at most a slot late; a key
taken back never fires; keys in one slot share one loop timer."""

import asyncio
import math

from fabric import deadlines
from fabric.deadlines import Deadlines


async def test_keys_fire_once_in_order_of_their_slots_and_never_early() -> None:
    loop = asyncio.get_running_loop()
    fired: list[tuple[str, float]] = []
    all_fired = loop.create_future()

    def fire(key: object) -> None:
        fired.append((str(key), loop.time()))
        if len(fired) == 2:
            all_fired.set_result(None)

    due = Deadlines(fire, granularity_s=0.01)
    start = loop.time()
    due.add(loop, start + 0.05, "later")
    due.add(loop, start + 0.02, "sooner")
    taken_back = due.add(loop, start + 0.02, "answered")
    due.discard(taken_back, "answered")
    await asyncio.wait_for(all_fired, 5)
    assert [key for key, _ in fired] == ["sooner", "later"]
    assert fired[0][1] >= start + 0.02 - 0.002, "not before its time (the loop's clock is ms-grained)"
    assert fired[1][1] >= start + 0.05 - 0.002
    assert len(due) == 0


async def test_keys_in_one_slot_share_one_timer(monkeypatch) -> None:
    loop = asyncio.get_running_loop()
    armed: list[float] = []
    real_call_at = loop.call_at
    monkeypatch.setattr(loop, "call_at", lambda when, *args: armed.append(when) or real_call_at(when, *args))
    due = Deadlines(lambda key: None, granularity_s=1.0)
    at = math.floor(loop.time()) + 10.2  # 100 keys 1 ms apart: all in one 1 s slot
    for n in range(100):
        due.add(loop, at + n / 1000, n)
    assert len(armed) == 1 and len(due) == 100


async def test_a_future_still_pending_when_due_times_out() -> None:
    loop = asyncio.get_running_loop()
    waiting, answered = loop.create_future(), loop.create_future()
    timeouts = deadlines.timeouts(loop)
    timeouts.add(loop, loop.time() + 0.01, waiting)
    timeouts.add(loop, loop.time() + 0.01, answered)
    answered.set_result("in time")
    done, _ = await asyncio.wait({waiting}, timeout=5)
    assert done == {waiting}, "the waiting future was not timed out"
    assert isinstance(waiting.exception(), TimeoutError)
    assert answered.result() == "in time"


async def test_a_failing_key_does_not_stop_the_rest_of_its_slot() -> None:
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    all_fired = loop.create_future()

    def fire(key: object) -> None:
        if key == "broken":
            raise RuntimeError("a caller's bug")
        fired.append(str(key))
        if len(fired) == 2:
            all_fired.set_result(None)

    due = Deadlines(fire, granularity_s=1.0)
    at = loop.time()
    for key in ("broken", "a", "b"):
        due.add(loop, at, key)
    await asyncio.wait_for(all_fired, 5)
    assert sorted(fired) == ["a", "b"]
