"""Per-function keep-alive from observed inter-arrival times: the hybrid histogram policy of
"Serverless in the Wild" (Shahrad et al., USENIX ATC'20). Pure: arrival times in, a policy out.

For each function, a histogram of the times between its invocations (bins of `bin_s` up to
`range_s`). When it is representative (enough samples, few beyond the range, bin counts
concentrated rather than flat):
  - prewarm window = the head percentile (5th), less a margin: for that long after an invocation
    the next one almost never comes, so the instance is unloaded and started again when it ends;
  - keep-alive window = the tail percentile (99th), plus a margin, less the prewarm window: the
    instance then waits that long for the next invocation.
Otherwise the node's own fixed keep-alive applies (the policy says 0). (The paper forecasts
functions whose arrivals mostly fall beyond the range with ARIMA; they get the default here.)
Counts are halved whenever they pass `max_samples`, so old arrivals fade and a change of
pattern is followed.
"""

import math
from dataclasses import dataclass, field

from scheduler.settings import KeepAliveSettings

RECOMPUTE_EVERY = 16  # arrivals between recomputations: a policy is O(bins), an arrival O(1)
# ... and seconds: bins are a minute wide, so a busy function's policy cannot change faster, and
# thousands of calls a second would otherwise recompute it hundreds of times a second.
RECOMPUTE_AT_MOST_EVERY_S = 1.0
MAX_ARRIVAL_HISTORIES = 100_000  # functions whose arrivals one replica keeps


@dataclass(frozen=True)
class KeepAlive:
    prewarm_after_s: float  # 0: keep the instance after an invocation; else unload, start again then
    keep_alive_s: float  # how long the (kept or prewarmed) instance waits; 0: the node's default
    source: str  # "histogram" or why the default applies
    _ms: tuple[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ms = (round(self.keep_alive_s * 1000), round(self.prewarm_after_s * 1000))
        object.__setattr__(self, "_ms", ms)

    def as_ms(self) -> tuple[int, int]:
        """(keep_alive_ms, prewarm_after_ms) as nodes are told them."""
        return self._ms


class Arrivals:
    """One function's inter-arrival histogram and its current policy."""

    def __init__(self, settings: KeepAliveSettings):
        self.settings = settings
        self.bins = [0] * max(1, math.ceil(settings.range_s / settings.bin_s))
        self.out_of_bounds = 0
        self.samples = 0  # gaps counted (in the bins or beyond them)
        self.last: float | None = None
        self._since_policy = 0
        self._computed_at = -math.inf
        self._policy = default_policy(settings, "too few arrivals yet")

    @property
    def current(self) -> KeepAlive:
        return self._policy

    def seen_elsewhere(self, at: float) -> None:
        """Another replica had an invocation at `at`: the next gap here is measured from it.
        (Each replica counts only the gaps ending at its own arrivals: an unbiased sample of
        all gaps, so the percentiles hold however the queue group spreads the calls.)"""
        if self.last is None or at > self.last:
            self.last = at

    def record(self, now: float) -> KeepAlive:
        """Count an invocation at `now`; returns the policy to apply after it."""
        if self.last is not None:
            gap = max(0.0, now - self.last)
            index = int(gap // self.settings.bin_s)
            if index < len(self.bins):
                self.bins[index] += 1
            else:
                self.out_of_bounds += 1
            self.samples += 1
            self._since_policy += 1
            if self.samples > self.settings.max_samples:
                self._age()
        self.last = now
        due = self._since_policy >= RECOMPUTE_EVERY and now - self._computed_at >= RECOMPUTE_AT_MOST_EVERY_S
        if due or (self._since_policy and self.samples <= self.settings.min_samples):
            self._policy = policy(self.bins, self.out_of_bounds, self.settings)
            self._since_policy = 0
            self._computed_at = now
        return self._policy

    def _age(self) -> None:
        """Halve every count: old arrivals fade, so a function whose pattern changes is followed."""
        self.bins = [count // 2 for count in self.bins]
        self.out_of_bounds //= 2
        self.samples = sum(self.bins) + self.out_of_bounds


def default_policy(settings: KeepAliveSettings, why: str) -> KeepAlive:
    return KeepAlive(0.0, 0.0, why)


def policy(bins: list[int], out_of_bounds: int, settings: KeepAliveSettings) -> KeepAlive:
    in_range = sum(bins)
    total = in_range + out_of_bounds
    if total < settings.min_samples:
        return default_policy(settings, "too few arrivals yet")
    if out_of_bounds / total > settings.max_out_of_bounds:
        return default_policy(settings, "arrivals mostly further apart than the histogram's range")
    if coefficient_of_variation(bins) < settings.min_cv:
        return default_policy(settings, "no pattern: arrivals spread evenly")
    head = percentile_bin(bins, settings.head_percentile) * settings.bin_s
    tail = (percentile_bin(bins, settings.tail_percentile) + 1) * settings.bin_s
    prewarm = head * (1 - settings.margin)
    keep = tail * (1 + settings.margin) - prewarm
    return KeepAlive(prewarm, keep, "histogram")


def percentile_bin(bins: list[int], pct: float) -> int:
    """Index of the bin holding the `pct` percentile of the counts."""
    wanted = sum(bins) * pct / 100
    seen = 0
    for index, count in enumerate(bins):
        seen += count
        if count and seen >= wanted:
            return index
    return len(bins) - 1


def coefficient_of_variation(bins: list[int]) -> float:
    mean = sum(bins) / len(bins)
    if mean == 0:
        return 0.0
    variance = sum((c - mean) ** 2 for c in bins) / len(bins)
    return math.sqrt(variance) / mean


class ArrivalBook:
    """Every function's arrivals as this replica sees them, with those the other replicas report
    in their beats; bounded, the oldest history forgotten first."""

    def __init__(self, settings: KeepAliveSettings, max_histories: int = MAX_ARRIVAL_HISTORIES):
        self.settings = settings
        self._max = max_histories
        self._arrivals: dict[tuple[str, str], Arrivals] = {}
        self._fresh: dict[tuple[str, str], float] = {}  # told to the other replicas at the next beat

    def arrived(self, fn: tuple[str, str], now: float) -> tuple[int, int]:
        """An invocation of `fn` (tenant, function) at wall time `now`: (keep_alive_ms,
        prewarm_after_ms) for the node that runs it."""
        self._fresh[fn] = now
        return self._of(fn).record(now).as_ms()

    def take_fresh(self) -> dict[str, float]:
        """Arrivals since the last call, as a beat carries them ("tenant/name" -> wall time)."""
        fresh, self._fresh = self._fresh, {}
        return {f"{tenant}/{name}": at for (tenant, name), at in fresh.items()}

    def arrived_elsewhere(self, arrivals: dict[str, float]) -> None:
        """Another replica's recent arrivals (from its beat)."""
        for name, at in arrivals.items():
            tenant, _, function = name.partition("/")
            self._of((tenant, function)).seen_elsewhere(at)

    def policy_of(self, fn: tuple[str, str]) -> KeepAlive | None:
        arrivals = self._arrivals.get(fn)
        return arrivals.current if arrivals else None

    def _of(self, fn: tuple[str, str]) -> Arrivals:
        arrivals = self._arrivals.get(fn)
        if arrivals is None:
            if len(self._arrivals) >= self._max:
                self._arrivals.pop(next(iter(self._arrivals)))
            arrivals = self._arrivals[fn] = Arrivals(self.settings)
        return arrivals
