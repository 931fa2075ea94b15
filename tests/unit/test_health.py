"""The health endpoint's answers (fabric/health.py)."""

from fabric import metrics
from fabric.health import Readiness, respond


def test_liveness_readiness_and_metrics_answer_by_path() -> None:
    registry = metrics.Registry()
    registry.counter("probe.hits", "hits", ()).add(())
    readiness = Readiness()

    assert respond("/healthz", readiness, registry) == (200, "text/plain", b"ok\n")
    assert respond("/readyz", readiness, registry) == (503, "text/plain", b"starting\n"), (
        "not before it serves"
    )
    readiness.check = lambda: None
    assert respond("/readyz?verbose", readiness, registry)[:2] == (200, "text/plain")
    status, kind, body = respond("/metrics", readiness, registry)
    assert status == 200 and kind.startswith("text/plain; version=0.0.4") and b"probe_hits" in body
    assert respond("/secrets", readiness, registry)[0] == 404


def test_a_failing_check_is_a_503_that_says_why_not_an_error() -> None:
    readiness = Readiness()

    def broken() -> str | None:
        raise RuntimeError("the view is gone")

    readiness.check = broken
    assert respond("/readyz", readiness, metrics.Registry()) == (
        503,
        "text/plain",
        b"readiness check failed: the view is gone\n",
    )
