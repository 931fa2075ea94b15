"""When a replica cut off from etcd stops taking work from the queue group (scheduler/fence.py)."""

import pytest

from scheduler.fence import FENCE_AFTER_S, should_fence


@pytest.mark.parametrize(
    ("fenced", "lost_for", "another", "expected", "why"),
    [
        (False, None, True, False, "etcd is there"),
        (False, FENCE_AFTER_S / 2, True, False, "a blip (an etcd leader election) is ridden through"),
        (False, FENCE_AFTER_S, True, True, "lost: another replica takes the work"),
        (False, 60.0, False, False, "every replica is cut off: a stale view beats no scheduler"),
        (True, 0.1, True, True, "fenced until the view is fresh again"),
        (True, None, True, False, "fresh again"),
        (True, 10.0, False, False, "the replica that took the work died or lost etcd too"),
    ],
)
def test_fencing(fenced: bool, lost_for: float | None, another: bool, expected: bool, why: str) -> None:
    assert should_fence(fenced, lost_for, another) is expected, why
