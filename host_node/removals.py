"""Functions removed while this node may still run one of their invocations. Pure bookkeeping.

An instance of a removed function that was running or starting at the removal stops once free,
instead of going back to idle. Only an invocation of *another* deployment brings the function
back (its record's `deployed_at` differs from the removed one's; not "later": the replicas'
clocks may differ by more than a remove-and-deploy takes): an invocation of the removed
deployment that the node handles after the notice (an invocation the scheduler sent just
before it, a cold start's second look at it) does not. Before, any invocation brought it back,
and such an instance went back to idle (tests/integration/test_remove.py, seen in CI)."""

REMOVED_FOR_S = 3600.0  # a removed function is remembered longer than any invocation runs


class Removals:
    def __init__(self) -> None:
        self._removed: dict[str, tuple[float, float]] = {}  # "tenant/name" -> (when, its deployed_at)

    def removed(self, function: str, deployed_at: float, now: float) -> None:
        self._removed[function] = (now, deployed_at)

    def invoked(self, function: str, deployed_at: float) -> None:
        """An invocation of `function`'s deployment of `deployed_at` (0: a scheduler that does
        not say): another deployment than the removed one is the function deployed again."""
        if not self._removed or (found := self._removed.get(function)) is None:
            return
        removed_deployment = found[1]
        if not deployed_at or not removed_deployment or deployed_at != removed_deployment:
            del self._removed[function]

    def __bool__(self) -> bool:
        return bool(self._removed)

    def __contains__(self, function: str) -> bool:
        return function in self._removed

    def forget_old(self, now: float) -> None:
        self._removed = {f: (at, d) for f, (at, d) in self._removed.items() if now - at < REMOVED_FOR_S}
