"""One trace per invocation across processes, exported as OTLP-JSON lines into the state directory."""

import asyncio
import base64
import http.server
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.client import Client, InvokeOutcome
from deploy import launcher
from fabric import telemetry
from tests.integration.conftest import EXAMPLES, start_cluster, wait_for_nodes
from tests.integration.test_cli import HETFAAS, hetfaas

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


def trace_of(state_dir: str, invocation_id: str, needed: set[str], root: str = "client.invoke") -> list[dict]:
    """The spans of one invocation's trace, once every name in `needed` has been exported."""
    deadline = time.monotonic() + 10
    while True:
        spans = read_spans(Path(state_dir) / "traces")
        roots = [
            s for s in spans if s["name"] == root and s["attrs"].get("faas.invocation_id") == invocation_id
        ]
        trace = [s for s in spans if roots and s["traceId"] == roots[0]["traceId"]]
        if {s["name"] for s in trace} >= needed:
            return trace
        assert time.monotonic() < deadline, f"spans did not arrive: {sorted(s['name'] for s in trace)}"
        time.sleep(0.05)  # the exporters flush every 100 ms here (OTEL_BSP_SCHEDULE_DELAY)


def duration_ms(span: dict) -> float:
    return (int(span["endTimeUnixNano"]) - int(span["startTimeUnixNano"])) / 1e6


COLD_PHASES = {
    "node.cold_start",
    "sandbox.slot_acquire",
    "sandbox.setup",
    "sandbox.exec",
    "runtime.init",
    "node.handler",
}
# A stem cell's sandbox and interpreter were started before the invocation: its start is the
# sandbox given the function (limits, code), then the handler's import.
STEM_CELL_PHASES = {"node.cold_start", "sandbox.assign", "runtime.init", "node.handler"}
START_PHASES = {"fresh": COLD_PHASES, "stem_cell": STEM_CELL_PHASES}
HOPS = {"client.invoke", "scheduler.invoke", "scheduler.attempt", "node.invoke"}


def test_a_cold_start_is_one_trace_with_every_phase_parented_across_processes(
    cluster: launcher.ClusterInfo, tenant: str
) -> None:
    """Tolerances: the node's phases cover its span to within 2 ms (the gaps between them are
    the node's own bookkeeping); each hop's span starts after its parent's, and ends before it
    where one waits for the other. The scheduler's may end after the client's, by any amount:
    the node answers the client directly and the scheduler only then hears its acknowledgement,
    two messages nothing orders (6.3 ms apart once, on a loaded machine)."""
    hetfaas(cluster.state_dir, "deploy", str(EXAMPLES / "hello-python"), "--tenant", tenant)
    result = json.loads(hetfaas(cluster.state_dir, "invoke", "hello", "--tenant", tenant, "--json").stdout)
    path = result["start_path"]
    trace = trace_of(cluster.state_dir, result["invocation_id"], HOPS | START_PHASES[path])

    by_name = {s["name"]: s for s in trace}
    client, sched = by_name["client.invoke"], by_name["scheduler.invoke"]
    attempt, node = by_name["scheduler.attempt"], by_name["node.invoke"]
    assert len(client["traceId"]) == 32 and "parentSpanId" not in client
    assert sched["parentSpanId"] == client["spanId"]
    assert attempt["parentSpanId"] == sched["spanId"]
    assert node["parentSpanId"] == attempt["spanId"], "the node's span hangs off the attempt that reached it"
    for parent, child in [(client, sched), (sched, attempt), (attempt, node)]:
        assert int(parent["startTimeUnixNano"]) <= int(child["startTimeUnixNano"])
    for parent, child in [(sched, attempt), (attempt, node)]:  # the parent waits for the child
        assert int(child["endTimeUnixNano"]) <= int(parent["endTimeUnixNano"])
    assert (client["service"], sched["service"], node["service"]) == ("cli", "scheduler-0", result["node"])
    assert attempt["attrs"]["hetfaas.node"] == result["node"] and attempt["attrs"]["hetfaas.attempt"] == "1"
    assert "warm" in attempt["attrs"]["hetfaas.placement"], "the attempt says why this node"
    assert node["attrs"]["faas.coldstart"] is True and node["attrs"]["faas.name"] == "hello"
    assert node["attrs"]["faas.trigger"] == "other" and node["attrs"]["hetfaas.pool_mode"]
    assert node["attrs"]["hetfaas.start_path"] == path
    assert {"hetfaas.shard", "hetfaas.slot_reused", "hetfaas.prewarmed"} <= set(node["attrs"])

    cold = by_name["node.cold_start"]
    assert (
        cold["parentSpanId"] == node["spanId"] and by_name["node.handler"]["parentSpanId"] == node["spanId"]
    )
    for phase in START_PHASES[path] - {"node.cold_start", "node.handler"} | {"runtime.start"}:
        assert by_name[phase]["parentSpanId"] == cold["spanId"], phase
    top = [s for s in trace if s.get("parentSpanId") == node["spanId"]]
    covered = sum(duration_ms(s) for s in top)
    assert covered <= duration_ms(node) + 0.01 and duration_ms(node) - covered < 2.0, (
        covered,
        duration_ms(node),
    )
    assert result["phases_ms"]["runtime_init_ms"] == pytest.approx(
        duration_ms(by_name["runtime.init"]), abs=0.01
    )


def test_a_warm_invocation_has_no_start_phases(cluster: launcher.ClusterInfo, tenant: str) -> None:
    """Sampled by its caller (a warm success is otherwise kept at the ratio), every hop follows."""
    hetfaas(cluster.state_dir, "deploy", str(EXAMPLES / "hello-python"), "--tenant", tenant)
    hetfaas(cluster.state_dir, "invoke", "hello", "--tenant", tenant)
    sampled = {"OTEL_TRACES_SAMPLER": "always_on"}
    warm = json.loads(
        hetfaas(cluster.state_dir, "invoke", "hello", "--tenant", tenant, "--json", env=sampled).stdout
    )
    trace = trace_of(cluster.state_dir, warm["invocation_id"], HOPS)

    node = next(s for s in trace if s["name"] == "node.invoke")
    assert warm["cold_start"] is False and node["attrs"]["faas.coldstart"] is False
    assert not {s["name"] for s in trace} & (COLD_PHASES | STEM_CELL_PHASES)


def test_the_trace_viewer_draws_the_waterfall_and_gives_the_spans(
    cluster: launcher.ClusterInfo, tenant: str
) -> None:
    hetfaas(cluster.state_dir, "deploy", str(EXAMPLES / "hello-python"), "--tenant", tenant)
    shown = hetfaas(
        cluster.state_dir, "invoke", "hello", "--tenant", tenant, "--data", "Ada", "--trace", "--json"
    )
    invocation_id = json.loads(shown.stdout)["invocation_id"]
    drawn = hetfaas(cluster.state_dir, "trace", invocation_id)
    as_json = json.loads(hetfaas(cluster.state_dir, "trace", invocation_id, "--json").stdout)
    unknown = hetfaas(cluster.state_dir, "trace", "no-such-invocation")

    lines = drawn.stdout.decode().splitlines()
    names = [line.split()[0] for line in lines[1:]]
    assert names[:4] == ["client.invoke", "scheduler.invoke", "scheduler.attempt", "node.invoke"], lines
    assert {"node.cold_start", "runtime.init", "node.handler"} <= set(names)
    assert "coldstart=True" in drawn.stdout.decode() and "█" in drawn.stdout.decode()
    assert shown.stderr.decode().count("node.invoke") == 1, "invoke --trace drew it after the output"
    assert {s["name"] for s in as_json} >= {"client.invoke", "node.invoke", "runtime.init"}
    node = next(s for s in as_json if s["name"] == "node.invoke")
    assert node["attributes"]["faas.invocation_id"] == invocation_id and node["duration_ms"] > 0
    assert unknown.returncode == 3 and b"not_found" in unknown.stderr


def test_invoke_trace_into_one_pipe_starts_the_waterfall_on_a_line_of_its_own(
    cluster: launcher.ClusterInfo, tenant: str
) -> None:
    """The function's output ends without a newline; stdout and stderr share a pipe (a CI log)."""
    hetfaas(cluster.state_dir, "deploy", str(EXAMPLES / "hello-python"), "--tenant", tenant)
    env = {**os.environ, "HETFAAS_STATE_DIR": str(cluster.state_dir)}
    env.pop("HETFAAS_NATS_URL", None)
    merged = subprocess.run(
        [*HETFAAS, "invoke", "hello", "--tenant", tenant, "--data", "Ada", "--trace"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        timeout=60,
    )
    lines = merged.stdout.decode().splitlines()
    assert merged.returncode == 0 and json.loads(lines[0])["greeting"] == "hello, Ada!"
    assert lines[1].startswith("trace "), lines[:3]
    alone = hetfaas(cluster.state_dir, "invoke", "hello", "--tenant", tenant, "--data", "Ada", "--trace")
    assert not alone.stdout.endswith(b"\n"), "stdout itself is the output, byte for byte"


def test_coldstarts_summarises_phases_by_pool_mode(
    cluster: launcher.ClusterInfo, tenant: str, tmp_path: Path
) -> None:
    fn = tmp_path / "counted"
    fn.mkdir()
    (fn / "function.toml").write_text(
        f'name = "counted-{tenant}"\nruntime = "python"\nhandler = "main:handle"\n'
    )
    (fn / "main.py").write_text("def handle(p):\n    return p\n")
    hetfaas(cluster.state_dir, "deploy", str(fn), "--tenant", tenant)
    first = json.loads(
        hetfaas(cluster.state_dir, "invoke", f"counted-{tenant}", "--tenant", tenant, "--json").stdout
    )
    trace_of(cluster.state_dir, first["invocation_id"], {"node.invoke", "runtime.init"})

    rows = json.loads(
        hetfaas(cluster.state_dir, "coldstarts", "--function", f"counted-{tenant}", "--json").stdout
    )
    table = hetfaas(cluster.state_dir, "coldstarts", "--since", "10m").stdout.decode()
    none = hetfaas(cluster.state_dir, "coldstarts", "--function", "never-deployed")

    by_phase = {r["phase"]: r for r in rows}
    whole = by_phase["node.invoke (whole start)"]
    assert whole["count"] == 1 and whole["p50_ms"] == pytest.approx(first["duration_ms"], rel=0.2)
    assert by_phase["runtime.init"]["p50_ms"] == pytest.approx(
        first["phases_ms"]["runtime_init_ms"], abs=0.01
    )
    assert 0 < by_phase["node.cold_start"]["share"] <= 1
    assert "PHASE" in table and "runtime.init" in table
    assert none.returncode == 0 and b"no cold starts traced for never-deployed" in none.stdout


@pytest.mark.privileged
def test_a_cold_start_carries_the_kernels_events(
    cluster: launcher.ClusterInfo, tenant: str, tmp_path: Path
) -> None:
    """bcc's tracepoints (deploy/setup.sh installs bcc, headers and tracefs): the exec and exit of
    the function's process, found by its host pid, at the kernel's timestamps, inside the start."""
    if os.geteuid() != 0:
        pytest.skip("bcc loads tracepoint programs: root only")
    fn = tmp_path / "catter"
    fn.mkdir()
    (fn / "function.toml").write_text('name = "catter"\nruntime = "exec"\ncommand = ["/bin/cat"]\n')
    hetfaas(cluster.state_dir, "deploy", str(fn), "--tenant", tenant)
    result = json.loads(
        hetfaas(cluster.state_dir, "invoke", "catter", "--tenant", tenant, "--data", "k", "--json").stdout
    )
    trace = trace_of(cluster.state_dir, result["invocation_id"], HOPS | {"kernel"})

    by_name = {s["name"]: s for s in trace}
    node, handler, kernel = by_name["node.invoke"], by_name["node.handler"], by_name["kernel"]
    assert kernel["parentSpanId"] == handler["spanId"]
    events = {e["name"]: e for e in kernel["events"]}
    assert {"kernel.sched_process_exec", "kernel.sched_process_exit"} <= set(events), list(events)
    pid = {
        a["key"]: a["value"]["intValue"]
        for a in events["kernel.sched_process_exec"]["attributes"]
        if a["key"] == "pid"
    }
    assert pid["pid"] == node["attrs"]["hetfaas.host_pid"], "found by the sandbox's host pid"
    exec_at = int(events["kernel.sched_process_exec"]["timeUnixNano"])
    assert int(node["startTimeUnixNano"]) <= exec_at <= int(node["endTimeUnixNano"]), "kernel time lines up"

    as_json = json.loads(hetfaas(cluster.state_dir, "trace", result["invocation_id"], "--json").stdout)
    shown = {e["name"]: e for e in next(s for s in as_json if s["name"] == "kernel")["events"]}
    assert shown["kernel.sched_process_exec"] == events["kernel.sched_process_exec"], "OTLP's shape"


class Collector(http.server.BaseHTTPRequestHandler):
    """A stand-in OTLP/HTTP collector: keeps what each path received, decoded as its Content-Type
    says (protobuf with OpenTelemetry's own messages, turned into OTLP/JSON's shape), and the
    headers it came with."""

    received: dict[str, list[dict]] = {}
    headers_seen: list[Any] = []  # each request's headers (case-insensitive, as HTTP's are)

    def do_POST(self) -> None:
        data = self.rfile.read(int(self.headers["Content-Length"]))
        Collector.headers_seen.append(self.headers)
        if self.headers["Content-Type"] == "application/x-protobuf":
            body = decode_protobuf(self.path, data)
        else:
            assert self.headers["Content-Type"] == "application/json"
            body = json.loads(data)
        Collector.received.setdefault(self.path, []).append(body)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def decode_protobuf(path: str, data: bytes) -> dict:
    from google.protobuf import json_format
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    message = ExportTraceServiceRequest() if path == "/v1/traces" else ExportMetricsServiceRequest()
    message.ParseFromString(data)
    body = json_format.MessageToDict(message)
    for rs in body.get("resourceSpans", []):  # ids: base64 in protobuf's JSON, hex in OTLP's
        for span in (span for ss in rs["scopeSpans"] for span in ss["spans"]):
            for key in ("traceId", "spanId", "parentSpanId"):
                if key in span:
                    span[key] = base64.b64decode(span[key]).hex()
    return body


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[http.server.ThreadingHTTPServer]:
    Collector.received, Collector.headers_seen = {}, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "300")
    yield server
    server.shutdown()


def wait_for_collector(invocation_id: str) -> None:
    deadline = time.monotonic() + 10
    while not ({"/v1/traces", "/v1/metrics"} <= set(Collector.received) and node_spans(invocation_id)):
        assert time.monotonic() < deadline, (invocation_id, sorted(Collector.received))
        time.sleep(0.1)


def metric_names() -> set[str]:
    return {
        m["name"]
        for body in Collector.received["/v1/metrics"]
        for rm in body["resourceMetrics"]
        for sm in rm["scopeMetrics"]
        for m in sm.get("metrics", [])
    }


def test_with_an_otlp_endpoint_spans_and_metrics_go_there_as_json_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, collector: http.server.ThreadingHTTPServer
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    info = start_cluster(tmp_path / "state", hosts=1)
    try:
        asyncio.run(wait_for_nodes(info, 1))
        hetfaas(info.state_dir, "deploy", str(EXAMPLES / "hello-python"))
        invoked = json.loads(hetfaas(info.state_dir, "invoke", "hello", "--json").stdout)
        wait_for_collector(invoked["invocation_id"])
    finally:
        launcher.stop(info)

    assert not list((tmp_path / "state" / "traces").glob("*.jsonl")), "nothing went to files"
    assert {h["Content-Type"] for h in Collector.headers_seen} == {"application/json"}
    assert {"faas.invoke_duration", "faas.coldstarts"} <= metric_names()


def test_over_http_protobuf_a_collector_sees_the_resource_headers_baggage_and_the_callers_span(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, collector: http.server.ThreadingHTTPServer
) -> None:
    """The collector's default protocol, by default. A program using the OpenTelemetry API calls
    the client library inside its own span, with baggage: the invocation's spans are children of
    that span, and every hop's spans carry the baggage as attributes."""
    from opentelemetry import baggage, context, trace

    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=ci,team=faas%2Cplatform")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20s3cret,x-tenant=ci")
    info = start_cluster(tmp_path / "state", hosts=1)
    theirs = trace.SpanContext(
        trace_id=0x5B8AA5A2D2C872E8321CF37308D69DF2,
        span_id=0x051581BF3CB55C13,
        is_remote=False,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )
    try:
        asyncio.run(wait_for_nodes(info, 1))
        hetfaas(info.state_dir, "deploy", str(EXAMPLES / "hello-python"))
        ctx = baggage.set_baggage(
            "user.id", "u-42", trace.set_span_in_context(trace.NonRecordingSpan(theirs))
        )
        token = context.attach(ctx)
        try:
            invoked = asyncio.run(invoke_as_a_library(info))
        finally:
            context.detach(token)
        wait_for_collector(invoked.invocation_id)
    finally:
        launcher.stop(info)

    assert {h["Content-Type"] for h in Collector.headers_seen} == {"application/x-protobuf"}
    assert all(
        h["authorization"] == "Bearer s3cret" and h["x-tenant"] == "ci" for h in Collector.headers_seen
    )
    spans = {
        (span["name"], service): (span, resource)
        for body in Collector.received["/v1/traces"]
        for rs in body["resourceSpans"]
        for resource in [{a["key"]: a["value"]["stringValue"] for a in rs["resource"]["attributes"]}]
        for service in [resource["service.name"]]
        for ss in rs["scopeSpans"]
        for span in ss["spans"]
        if span["traceId"] == f"{theirs.trace_id:032x}"
    }
    client, _ = spans[("client.invoke", "library-user")]
    _, node_resource = spans[("node.invoke", "host-1")]
    assert client["parentSpanId"] == f"{theirs.span_id:016x}", "the invocation hangs off the caller's span"
    assert node_resource["deployment.environment"] == "ci" and node_resource["team"] == "faas,platform"
    assert node_resource["service.instance.id"] == "host-1"
    for span, _ in spans.values():
        attrs = {a["key"]: a["value"].get("stringValue") for a in span["attributes"]}
        assert attrs.get("user.id") == "u-42", span["name"]
    assert {("scheduler.invoke", "scheduler-0"), ("scheduler.attempt", "scheduler-0")} <= set(spans)
    assert {"faas.invoke_duration", "faas.coldstarts"} <= metric_names()


async def invoke_as_a_library(info: launcher.ClusterInfo) -> InvokeOutcome:
    telemetry.setup_tracing("library-user", None, True)
    try:
        client = await Client.connect(info.nats_url, "library-user", creds=info.nats_creds, ca=info.nats_ca)
        try:
            outcome = await client.invoke("default", "hello", b"Ada")
        finally:
            await client.close()
    finally:
        telemetry.stop_tracing()
    assert outcome.ok, outcome.error
    return outcome


def node_spans(invocation_id: str) -> list[dict]:
    return [
        span
        for body in Collector.received.get("/v1/traces", [])
        for rs in body["resourceSpans"]
        for ss in rs["scopeSpans"]
        for span in ss["spans"]
        if span["name"] == "node.invoke"
        and {"key": "faas.invocation_id", "value": {"stringValue": invocation_id}} in span["attributes"]
    ]


def test_a_deploy_is_a_trace_of_its_own(cluster: launcher.ClusterInfo, tenant: str) -> None:
    deployed = hetfaas(cluster.state_dir, "deploy", str(EXAMPLES / "hello-python"), "--tenant", tenant)
    assert deployed.returncode == 0, deployed.stderr
    deadline = time.monotonic() + 10
    while True:
        spans = read_spans(Path(cluster.state_dir) / "traces")
        roots = [
            s for s in spans if s["name"] == "client.deploy" and s["attrs"].get("hetfaas.tenant") == tenant
        ]
        server = [
            s
            for s in spans
            if roots and s["name"] == "scheduler.deploy" and s["traceId"] == roots[0]["traceId"]
        ]
        if server:
            break
        assert time.monotonic() < deadline, "the deploy's spans did not arrive"
        time.sleep(0.05)
    assert server[0]["parentSpanId"] == roots[0]["spanId"]
    assert server[0]["attrs"]["faas.name"] == "hello" and server[0]["attrs"]["hetfaas.updated"] is True
