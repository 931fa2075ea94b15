"""Background starts wait for a quiet node (host_node/quiet.py)."""

import asyncio
import time

from host_node.quiet import Quiet


async def test_a_quiet_node_starts_at_once() -> None:
    started = time.monotonic()
    await Quiet(lambda: False).wait(max_wait_s=5)
    assert time.monotonic() - started < 0.5


async def test_a_start_waits_for_the_last_invocation_to_end() -> None:
    running = {"n": 1}
    quiet = Quiet(lambda: running["n"] > 0)
    waiting = asyncio.ensure_future(quiet.wait(max_wait_s=30))
    await asyncio.sleep(0)
    assert not waiting.done(), "an invocation runs: the start waits"
    running["n"] = 0
    quiet.idle()  # as the node says when its last invocation ends
    await asyncio.wait_for(waiting, 5)


async def test_a_node_never_idle_still_starts_after_the_longest_wait() -> None:
    started = time.monotonic()
    await Quiet(lambda: True).wait(max_wait_s=0.2)
    assert 0.15 < time.monotonic() - started < 5
