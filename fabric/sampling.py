"""Which traces are kept: the OTEL_TRACES_SAMPLER samplers, with the decision for invocations made
late.

Whether a warm invocation is worth its spans is known only at its end, at the node: cold starts
and failures are always kept in full, warm successes at the sampler's ratio. So a root that the
ratio leaves out is *deferred*, not dropped: each hop keeps only its span's ids and start time
(`tracing.Deferred`, no Span built) and sends `traceparent` on with our `tracestate` member
saying so. The node decides (`keeps`), says so in its acknowledgement and its reply, and the
hops that hear it build and export their spans; the rest are forgotten at their end.

Control requests (deploy, remove, verify) are not deferrable: they are rare, and an operator
wants each one's trace, so a ratio sampler keeps them all. `always_off` keeps nothing.
"""

import logging
import os
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

DROP, SAMPLE, DEFER = 0, 1, 2  # a trace's decision, as it crosses hops
DEFAULT_SAMPLER = "parentbased_traceidratio"
DEFAULT_RATIO = 0.1  # of warm successful invocations; ours, where OpenTelemetry's default is 1.0

# (trace id, the parent's decision or None for a root, deferrable) -> decision
Sampler = Callable[[int, int | None, bool], int]


def sampler_from_env(environ: Mapping[str, str] = os.environ) -> Sampler:
    name = environ.get("OTEL_TRACES_SAMPLER", DEFAULT_SAMPLER).strip().lower()
    try:
        ratio = float(environ.get("OTEL_TRACES_SAMPLER_ARG", str(DEFAULT_RATIO)))
    except ValueError:
        log.warning("OTEL_TRACES_SAMPLER_ARG is not a number: sampling %.0f%%", DEFAULT_RATIO * 100)
        ratio = DEFAULT_RATIO
    base = name.removeprefix("parentbased_")
    if base not in ("always_on", "always_off", "traceidratio"):
        log.warning("unknown OTEL_TRACES_SAMPLER %r: using %s", name, DEFAULT_SAMPLER)
        name, base = DEFAULT_SAMPLER, "traceidratio"
    root = _root(base, ratio)
    if name.startswith("parentbased_"):
        return lambda trace_id, parent, deferrable: root(trace_id, deferrable) if parent is None else parent
    if base == "always_off":
        return lambda trace_id, parent, deferrable: DROP

    def by_trace(trace_id: int, parent: int | None, deferrable: bool) -> int:
        # not parent-based: the trace id decides at every hop alike; a deferred trace stays one
        return root(trace_id, deferrable or parent == DEFER)

    return by_trace


def _root(base: str, ratio: float) -> Callable[[int, bool], int]:
    if base == "always_on":
        return lambda trace_id, deferrable: SAMPLE
    if base == "always_off":
        return lambda trace_id, deferrable: DROP
    bound = int(max(0.0, min(ratio, 1.0)) * (1 << 64))

    def by_ratio(trace_id: int, deferrable: bool) -> int:
        if (trace_id & 0xFFFFFFFFFFFFFFFF) < bound:
            return SAMPLE
        return DEFER if deferrable else SAMPLE

    return by_ratio


def keeps(error: bool, cold_start: bool) -> bool:
    """Whether an invocation's deferred trace is kept: cold starts and failures always are."""
    return error or cold_start
