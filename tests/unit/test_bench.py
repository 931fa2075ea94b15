"""The pure benchmarks still run (a few decisions, a small trace) and say something sane."""

from bench import keepalive, placement


def test_placement_benchmark_runs_and_looks_at_few_nodes() -> None:
    row = placement.run(size=200, decisions=300, seed=1)
    assert row["nodes"] == 200 and row["considered"] < 10 and row["p50_us"] > 0


def test_keepalive_benchmark_compares_the_policies_on_one_trace() -> None:
    results = keepalive.run(functions=20, days=0.5, seed=1)
    totals = results["totals"]
    assert {o.invocations for o in totals.values()} == {totals["fixed 10 min"].invocations}
    assert "histogram (hybrid)" in keepalive.report(results, 20, 0.5)
