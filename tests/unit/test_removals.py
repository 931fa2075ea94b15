"""A removed function comes back on a node only with a later deployment: an invocation of the
removed one, handled after the notice, leaves it removed (its instance stops once free)."""

from host_node.removals import REMOVED_FOR_S, Removals


def test_an_invocation_of_the_removed_deployment_leaves_it_removed() -> None:
    removals = Removals()
    removals.removed("t/slow", deployed_at=100.0, now=0.0)
    removals.invoked("t/slow", deployed_at=100.0)  # sent just before the removal, handled after
    assert "t/slow" in removals
    removals.invoked("t/slow", deployed_at=99.0)  # deployed again, by a replica whose clock is behind
    assert "t/slow" not in removals


def test_a_scheduler_that_does_not_say_brings_it_back_as_before() -> None:
    removals = Removals()
    removals.removed("t/f", deployed_at=0.0, now=0.0)
    removals.invoked("t/f", deployed_at=100.0)
    assert "t/f" not in removals


def test_a_removal_is_forgotten_after_any_invocation_could_run() -> None:
    removals = Removals()
    removals.removed("t/f", deployed_at=1.0, now=0.0)
    removals.forget_old(now=REMOVED_FOR_S - 1)
    assert "t/f" in removals
    removals.forget_old(now=REMOVED_FOR_S + 1)
    assert "t/f" not in removals
