"""One trace per invocation across processes, exported as OTLP-JSON lines into the state directory."""

import json
import time
from pathlib import Path

import pytest

from deploy import launcher
from tests.integration.conftest import EXAMPLES
from tests.integration.test_cli import hetfaas

pytestmark = pytest.mark.integration


def read_spans(traces_dir: Path) -> list[dict]:
    """Every exported span, with its service name and its attributes as a plain dict."""
    spans = []
    for path in traces_dir.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            for resource_spans in json.loads(line)["resourceSpans"]:
                service = next(
                    a["value"]["stringValue"]
                    for a in resource_spans["resource"]["attributes"]
                    if a["key"] == "service.name"
                )
                for scope in resource_spans["scopeSpans"]:
                    for span in scope["spans"]:
                        attrs = {
                            a["key"]: next(iter(a["value"].values())) for a in span.get("attributes", [])
                        }
                        spans.append({**span, "service": service, "attrs": attrs})
    return spans


def test_an_invocation_is_one_trace_across_client_scheduler_and_node(
    cluster: launcher.ClusterInfo, tenant: str
) -> None:
    hetfaas(cluster.state_dir, "deploy", str(EXAMPLES / "hello-python"), "--tenant", tenant)
    result = json.loads(hetfaas(cluster.state_dir, "invoke", "hello", "--tenant", tenant, "--json").stdout)
    invocation_id = result["invocation_id"]

    names = {"client.invoke", "scheduler.invoke", "node.invoke"}
    deadline = time.monotonic() + 10
    while True:
        spans = read_spans(Path(cluster.state_dir) / "traces")
        roots = [s for s in spans if s["attrs"].get("faas.invocation_id") == invocation_id]
        trace = [s for s in spans if roots and s["traceId"] == roots[0]["traceId"]]
        if {s["name"] for s in trace} >= names:
            break
        assert time.monotonic() < deadline, f"spans did not arrive: {trace}"
        time.sleep(0.05)  # the exporters flush every 100 ms here (OTEL_BSP_SCHEDULE_DELAY)

    by_name = {s["name"]: s for s in trace}
    client, sched, node = by_name["client.invoke"], by_name["scheduler.invoke"], by_name["node.invoke"]
    assert {s["traceId"] for s in (client, sched, node)} == {client["traceId"]}
    assert len(client["traceId"]) == 32 and "parentSpanId" not in client
    assert sched["parentSpanId"] == client["spanId"]
    assert node["parentSpanId"] == sched["spanId"]
    forwards = [e for e in sched["events"] if e["name"] == "forward"]
    assert [a["value"] for e in forwards for a in e["attributes"]] == [
        {"stringValue": result["node"]},
        {"intValue": "1"},
    ], "the scheduler's span records each attempt: which node, which try"
    assert (client["service"], sched["service"], node["service"]) == ("cli", "scheduler-0", result["node"])
    assert node["attrs"]["faas.coldstart"] is True and node["attrs"]["faas.name"] == "hello"
