"""The pure benchmarks still run (a few decisions, a small trace) and say something sane."""

import uvloop

from bench import cpu_split, hops, keepalive, placement, scheduler_cpu, span_cost, warm_invoke
from host_node.sandbox.settings import SandboxSettings


def test_placement_benchmark_runs_and_looks_at_few_nodes() -> None:
    row = placement.run(size=200, decisions=300, seed=1)
    assert row["nodes"] == 200 and row["considered"] < 10 and row["p50_us"] > 0


def test_keepalive_benchmark_compares_the_policies_on_one_trace() -> None:
    results = keepalive.run(functions=20, days=0.5, seed=1)
    totals = results["totals"]
    assert {o.invocations for o in totals.values()} == {totals["fixed 10 min"].invocations}
    assert "histogram (hybrid)" in keepalive.report(results, 20, 0.5)


def test_scheduler_cpu_benchmark_places_every_invocation_in_each_variant() -> None:
    """Both paths: the fast path raises if it does not take a warm invocation."""
    for variant in ("off", "dropped", "exported"):
        for path in ("fast", "handler"):
            assert uvloop.run(scheduler_cpu.cpu_per_invocation(200, variant, path)) > 0


def test_cpu_split_tells_the_path_s_processes_apart() -> None:
    assert cpu_split.role_of(b"/v/bin/python\0-m\0scheduler\0--config\0/s/scheduler-0.toml") == "scheduler"
    assert cpu_split.role_of(b"python3\0-I\0-S\0/r/python_worker.py\03\0main:handle") == "python instance"
    assert cpu_split.role_of(b"/usr/bin/sshd") is None
    hop = b"/v/bin/python\0-m\0bench.hops\0--role\0"
    assert cpu_split.role_of(hop + b"bus-forward-inline\0nats://x\0e", hops.ROLES) == "forwarder"
    assert cpu_split.role_of(hop + b"fast-echo\0nats://x", hops.ROLES) == "echo responder"
    assert cpu_split.role_of(hop + b"node\0nats://x\0s\0" + b"1\08\0/c", hops.ROLES) == "node"


def test_cpu_split_changes_only_the_sandbox_mode_it_is_given() -> None:
    assert cpu_split.host_settings(False, None) == {"tracing": False}  # the cluster's own sandbox
    plain = cpu_split.host_settings(True, "plain")["sandbox"]
    assert isinstance(plain, SandboxSettings) and plain.mode == "plain"
    assert plain.cgroup_parent  # never the machine's cgroup root, where another cluster may be


def test_ratios_are_taken_pair_by_pair() -> None:
    """A fast raw round must not be set against a slow e2e round from another moment."""
    raw = [{"req_per_s": r} for r in (100, 200, 400)]
    e2e = [{"req_per_s": r} for r in (30, 60, 120)]  # 30% in every pair, whatever the drift
    assert warm_invoke.paired_ratio(raw, e2e) == {"median": 0.3, "low": 0.3, "high": 0.3}
    assert warm_invoke.ratio_cell({"median": 0.3, "low": 0.25, "high": 0.41}) == "30% (25%-41%)"


def test_span_cost_benchmark_exports_the_spans_it_makes(tmp_path) -> None:
    for variant in span_cost.VARIANTS:
        assert span_cost.cpu_per_round_trip(variant, 300, tmp_path) > 0
    for exported in ("exported", "exported_on_loop"):
        assert (tmp_path / f"{exported}.jsonl").read_bytes().count(b'"spanId"') == 600, exported
    assert (
        not (tmp_path / "dropped.jsonl").exists()
        or b"spanId" not in (tmp_path / "dropped.jsonl").read_bytes()
    )
