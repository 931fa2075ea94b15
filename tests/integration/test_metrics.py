"""Metrics as Prometheus scrapes them from the real services: OpenTelemetry's FaaS names in seconds,
the counters an operator alerts on, CPU and memory per function, queue time, and the Grafana
dashboard's queries naming only metrics the services serve."""

import json
import os
import re
import tomllib
import urllib.request
from pathlib import Path

import pytest

from cli.client import Client
from deploy import launcher
from host_node.runtimes.exec import run_exec
from host_node.sandbox.settings import SandboxSettings
from host_node.spawner import PlainSpawner, Process
from tests.integration.conftest import EXAMPLES, make_function, metric_value, scrape, wait_until
from tests.integration.test_cli import hetfaas

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "observability" / "grafana-dashboard.json"
WORKS = """
def handle(payload):
    if payload == b"fail":
        raise ValueError("asked to fail")
    if payload == b"hang":
        import time
        time.sleep(5)
    if payload == b"burn":
        import time
        started = time.process_time()
        while time.process_time() - started < 0.3:  # CPU time, which /proc counts in 10 ms ticks
            pass
    return b"ok"
"""


def test_every_service_serves_prometheus_metrics(cluster: launcher.ClusterInfo, tenant: str) -> None:
    hetfaas(cluster.state_dir, "deploy", str(EXAMPLES / "hello-python"), "--tenant", tenant)
    runs = [
        json.loads(hetfaas(cluster.state_dir, "invoke", "hello", "--tenant", tenant, "--json").stdout)
        for _ in range(3)
    ]
    node = runs[0]["node"]
    assert {r["node"] for r in runs} == {node}, "warm calls stay on the node that started it"
    host, scheduler = scrape(cluster.state_dir, node), scrape(cluster.state_dir, "scheduler-0")

    mine = f'faas_name="hello",hetfaas_tenant="{tenant}"'
    assert metric_value(host, f"faas_invocations_total{{{mine}}}") == 3
    assert metric_value(host, f"faas_coldstarts_total{{{mine}") == 1
    assert "# TYPE faas_invoke_duration_seconds histogram" in host
    assert metric_value(host, f'faas_invoke_duration_seconds_count{{{mine},faas_coldstart="false"}}') == 2
    assert metric_value(host, f"faas_init_duration_seconds_count{{{mine}") == 1
    warm_s = metric_value(host, f'faas_invoke_duration_seconds_sum{{{mine},faas_coldstart="false"}}')
    assert 0 < warm_s < 2, f"seconds, not milliseconds: two warm calls took {warm_s}"
    assert f'faas_invoke_duration_seconds_bucket{{{mine},faas_coldstart="false",le="0.001"}}' in host
    if os.geteuid() == 0:  # sandbox pools (plain processes otherwise)
        assert "hetfaas_pool_ready{" in host and "hetfaas_pool_created_total{" in host
    assert "# TYPE hetfaas_scheduler_queued gauge" in scheduler
    assert "hetfaas_scheduler_throttled_total" in scheduler
    queued = f'hetfaas_scheduler_queue_duration_seconds_count{{hetfaas_tenant="{tenant}"}}'
    assert metric_value(scheduler, queued) == 3, "each invocation's wait, the fast path's too"


async def test_errors_timeouts_cpu_and_memory_per_function(
    cluster: launcher.ClusterInfo, client: Client, tenant: str, tmp_path: Path
) -> None:
    manifest = 'runtime = "python"\nhandler = "main:handle"\ntimeout_ms = 1000\n'
    fn = make_function(tmp_path, "works", manifest, {"main.py": WORKS})
    await client.deploy(fn, tenant=tenant)
    burned = await client.invoke(tenant, "works", b"burn")
    failed = await client.invoke(tenant, "works", b"fail")
    hung = await client.invoke(tenant, "works", b"hang", timeout_ms=10_000)
    fresh = await client.invoke(tenant, "works", b"")  # in a new instance: the hung one was stopped
    scheduler_before = scrape(cluster.state_dir, "scheduler-0")
    unknown = await client.invoke(tenant, "no-such-function")
    assert burned.ok and failed.error.code == "function_error" and hung.error.code == "timeout"
    assert fresh.ok and fresh.reply.cold_start and unknown.error.code == "not_found"
    host = scrape(cluster.state_dir, "host-1") + scrape(cluster.state_dir, "host-2")
    scheduler = scrape(cluster.state_dir, "scheduler-0")

    mine = f'faas_name="works",hetfaas_tenant="{tenant}"'
    assert metric_value(host, f"faas_invocations_total{{{mine}}}") == 4
    assert metric_value(host, f'faas_errors_total{{{mine},error_type="function_error"}}') == 1
    assert metric_value(host, f'faas_errors_total{{{mine},error_type="timeout"}}') == 1
    assert metric_value(host, f"faas_timeouts_total{{{mine}}}") == 1
    cpu_s = metric_value(host, f"hetfaas_function_cpu_time_seconds_total{{{mine}}}")
    assert cpu_s >= 0.25, f"the burn's 0.3 s of CPU counts, read as its instance was stopped: {cpu_s}"
    assert "# TYPE hetfaas_function_cpu_time_seconds_total counter" in host
    assert metric_value(host, f"hetfaas_function_memory_bytes{{{mine}}}") > 4 << 20, "the live instance's RSS"
    not_found = 'hetfaas_scheduler_errors_total{error_type="not_found"}'
    assert metric_value(scheduler, not_found) == metric_value(scheduler_before, not_found) + 1


# Burns CPU in a child (a subshell), then prints `times`: the shell's and its children's CPU.
BURN_IN_A_CHILD = """#!/bin/sh
( i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done )
times
"""


def seconds_of(times_line: str) -> float:
    """`0m0.31s 0m0.02s` (user, system) as seconds."""
    total = 0.0
    for field in times_line.split():
        minutes, _, rest = field.partition("m")
        total += int(minutes) * 60 + float(rest.rstrip("s"))
    return total


async def test_an_exec_functions_cpu_counts_each_short_call_whole(
    cluster: launcher.ClusterInfo, client: Client, tenant: str, tmp_path: Path
) -> None:
    """A process per call lives between two scrapes: its CPU (what it started, too) is counted at
    its exit, from its sandbox's cgroup (wait4 in plain mode)."""
    fn = make_function(
        tmp_path,
        "burner",
        'runtime = "exec"\ncommand = ["./burn.sh"]\ntimeout_ms = 20000\n',
        {"burn.sh": BURN_IN_A_CHILD},
    )
    await client.deploy(fn, tenant=tenant)
    outcomes = [await client.invoke(tenant, "burner") for _ in range(2)]
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    said = sum(seconds_of(line) for o in outcomes for line in o.reply.output.decode().splitlines())
    host = scrape(cluster.state_dir, "host-1") + scrape(cluster.state_dir, "host-2")

    counted = metric_value(
        host, f'hetfaas_function_cpu_time_seconds_total{{faas_name="burner",hetfaas_tenant="{tenant}"}}'
    )
    assert said >= 0.05, f"the loops burned some CPU: {said}"
    # `times` counts in 10 ms ticks, two lines a call; the cgroup's count is exact
    assert counted >= said - 0.04 * len(outcomes), f"counted {counted} s of the {said} s the calls used"
    assert counted < said + 1.0, "no other function's CPU"


async def test_a_plain_process_reports_its_cpu_and_its_childrens_at_exit(tmp_path: Path) -> None:
    """Plain mode (no sandbox, no cgroup): wait4's count, which holds the children it waited for."""
    (tmp_path / "burn.sh").write_text(BURN_IN_A_CHILD)
    (tmp_path / "burn.sh").chmod(0o755)
    seen: list[Process] = []
    limits = SandboxSettings(mode="plain").limits_for(128)
    output = await run_exec(PlainSpawner(), ["./burn.sh"], tmp_path, b"", 20.0, 4096, limits, {}, seen.append)

    said = sum(seconds_of(line) for line in output.decode().splitlines())
    [proc] = seen
    assert proc.exited.done() and proc.cpu_s is not None
    assert said >= 0.05 and said - 0.04 <= proc.cpu_s < said + 0.5, (said, proc.cpu_s)


def dashboard_metrics() -> set[str]:
    """The metric names the dashboard's queries use (histogram series named by their family)."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs.append(dashboard["templating"]["list"][1]["query"]["query"])
    # Label names stand in selectors ({...}) and groupings (by (...)): leave those out.
    bare = [re.sub(r"\{[^}]*\}|\bby \([^)]*\)|, [a-z_]+\)$", "", e) for e in exprs]
    names = {n for e in bare for n in re.findall(r"\b((?:faas|hetfaas)_[a-z_]+)\b", e)}
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def served_metrics(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def ready(state_dir: str, service: str) -> bool:
    """/readyz says 200: the service is serving (its instruments exist)."""
    settings = tomllib.loads((Path(state_dir) / "config" / f"{service}.toml").read_text())
    try:
        with urllib.request.urlopen(f"http://{settings['metrics_listen']}/readyz", timeout=5) as response:
            return response.status == 200
    except OSError:  # not listening yet, or 503 (an HTTPError)
        return False


async def test_the_dashboard_queries_only_metrics_the_services_serve(
    cluster: launcher.ClusterInfo, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the verifier's metrics come from a verifier, which needs root")
    served = served_metrics(scrape(cluster.state_dir, "host-1")) | served_metrics(
        scrape(cluster.state_dir, "scheduler-0")
    )
    verifier = launcher.up(tmp_path / "state", hosts=0, verifiers=1)
    try:
        assert await wait_until(lambda: ready(verifier.state_dir, "verifier-0"), timeout_s=30)
        served |= served_metrics(scrape(verifier.state_dir, "verifier-0"))
    finally:
        launcher.stop(verifier)
    missing = dashboard_metrics() - served
    assert not missing, f"the dashboard asks for metrics no service serves: {sorted(missing)}"
    assert {"faas_invocations_total", "faas_errors_total", "hetfaas_verifier_verdicts_total"} <= served
