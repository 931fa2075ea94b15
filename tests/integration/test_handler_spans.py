"""A handler's own OpenTelemetry spans join the invocation's trace: made in the sandbox with the
OpenTelemetry SDK from the function's layer, under `context.traceparent`, and exported by the
node (the sandbox has no network). Spans a function makes for another trace are dropped."""

import json
from pathlib import Path

import pytest

from deploy import launcher
from tests.integration.conftest import make_function
from tests.integration.test_cli import hetfaas
from tests.integration.test_tracing import read_spans, trace_of

pytestmark = pytest.mark.integration

WHEELS = Path(__file__).resolve().parents[2] / ".state" / "test-wheels"  # deploy/setup.sh fills it
HANDLER = """
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

tracer = trace.get_tracer("shop")


def handle(event, context):
    parent = TraceContextTextMapPropagator().extract({"traceparent": context.traceparent})
    with tracer.start_as_current_span("render", context=parent) as span:
        span.set_attribute("shop.items", len(event["items"]))
        with tracer.start_as_current_span("price"):
            total = sum(event["items"])
    forged = TraceContextTextMapPropagator().extract(
        {"traceparent": "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"}
    )
    with tracer.start_as_current_span("elsewhere", context=forged):
        pass
    return {"total": total}
"""


def test_a_handlers_own_spans_are_in_the_invocations_trace(
    cluster: launcher.ClusterInfo, tenant: str, tmp_path: Path
) -> None:
    assert (WHEELS / ".wanted").is_file(), f"{WHEELS} is missing: run deploy/setup.sh"
    manifest = 'runtime = "python"\nhandler = "shop:handle"\npayload = "json"\n'
    manifest += '[python]\nrequirements = ["opentelemetry-sdk==1.45.2"]\n'
    function = make_function(tmp_path, "shop", manifest, {"shop.py": HANDLER})
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(WHEELS), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    deployed = hetfaas(cluster.state_dir, "deploy", str(function), "--tenant", tenant, env=env, timeout_s=180)
    assert deployed.returncode == 0, deployed.stderr

    invoked = hetfaas(
        cluster.state_dir, "invoke", "shop", "--tenant", tenant, "--data", '{"items": [2, 3]}', "--json"
    )
    result = json.loads(invoked.stdout)
    assert json.loads(result["output"]) == {"total": 5}, result
    trace = trace_of(cluster.state_dir, result["invocation_id"], {"node.invoke", "render", "price"})

    by_name = {span["name"]: span for span in trace}
    node, render, price = by_name["node.invoke"], by_name["render"], by_name["price"]
    assert render["parentSpanId"] == node["spanId"], "the handler's span hangs off the node's span"
    assert price["parentSpanId"] == render["spanId"]
    assert render["attrs"]["shop.items"] == "2" or render["attrs"]["shop.items"] == 2
    assert render["attrs"]["hetfaas.from_handler"] is True
    assert render["service"] == result["node"], "exported by the node the function ran on"
    everything = read_spans(Path(cluster.state_dir) / "traces")  # exported with the others, if at all
    assert not [s for s in everything if s["name"] == "elsewhere"], (
        "another trace is not the function's to add to"
    )
