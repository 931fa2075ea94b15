"""Laying a start's measured phases out as spans."""

from host_node.phase_spans import MS, PhaseSpan, layout

START = 1_000 * MS


def test_a_python_cold_start_end_to_end() -> None:
    phases = {
        "bundle_fetch_ms": 2.0,
        "acquire_ms": 30.0,
        "slot_acquire_ms": 1.0,
        "sandbox_setup_ms": 0.5,
        "exec_ms": 3.0,
        "runtime_init_ms": 20.0,
        "handler_ms": 5.0,
    }
    spans = layout(phases, START, START + 40 * MS, cold=True, runtime="python")
    at = lambda ms: START + round(ms * MS)  # noqa: E731
    assert spans == [
        PhaseSpan("node.bundle_fetch", at(0), at(2)),
        PhaseSpan("node.cold_start", at(2), at(32)),
        PhaseSpan("sandbox.slot_acquire", at(2), at(3), "node.cold_start"),
        PhaseSpan("sandbox.setup", at(3), at(3.5), "node.cold_start"),
        PhaseSpan("sandbox.exec", at(3.5), at(6.5), "node.cold_start"),
        PhaseSpan("runtime.start", at(6.5), at(12), "node.cold_start"),
        PhaseSpan("runtime.init", at(12), at(32), "node.cold_start"),
        PhaseSpan("node.handler", at(35), at(40)),
    ]


def test_phases_never_overrun_the_node_span() -> None:
    """Measured on different clocks, phases can add up to a little more than the span: the
    handler is cut to fit rather than overlap the start."""
    spans = layout({"acquire_ms": 30.0, "handler_ms": 15.0}, START, START + 40 * MS, True, "python")
    handler = spans[-1]
    assert handler.start_ns == START + 30 * MS and handler.end_ns == START + 40 * MS


def test_a_warm_python_call_has_no_phase_spans_and_exec_always_starts_a_process() -> None:
    assert layout({"acquire_ms": 0.01, "handler_ms": 1.0}, START, START + MS, False, "python") == []
    exec_spans = layout({"exec_ms": 1.0, "handler_ms": 4.0}, START, START + 5 * MS, False, "exec")
    assert [(s.name, s.parent) for s in exec_spans] == [
        ("node.handler", ""),
        ("sandbox.exec", "node.handler"),
    ]
