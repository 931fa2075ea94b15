"""The decision for a warm invocation made at its end: deferred spans build nothing unless kept,
are kept by a cold start or a failure, and carry tracestate and baggage across hops."""

import json

import pytest

from fabric import otlp_proto, propagation, tracing
from fabric.propagation import OUR_MEMBER, Propagators
from fabric.sampling import sampler_from_env
from fabric.span_export import BatchExporter
from fabric.tracing import Deferred, Scope, Span, Tracer, Unsampled

BOTH = Propagators(tracecontext=True, baggage=True)
NEVER_BY_RATIO = {"OTEL_TRACES_SAMPLER_ARG": "0", "OTEL_BSP_SCHEDULE_DELAY": "60000"}


def tracer(env: dict[str, str] | None = None) -> tuple[Tracer, list[dict]]:
    env = env or NEVER_BY_RATIO
    written: list[dict] = []
    exporter = BatchExporter("svc", lambda body: written.append(json.loads(body)), env)
    return Tracer(exporter, sampler_from_env(env), BOTH), written


def names(written: list[dict]) -> list[str]:
    return sorted(
        s["name"]
        for b in written
        for rs in b["resourceSpans"]
        for ss in rs["scopeSpans"]
        for s in ss["spans"]
    )


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of every Span object made."""
    made: list[str] = []
    original = Span.__init__

    def counting(self: Span, name: str, *args: object, **kwargs: object) -> None:
        made.append(name)
        original(self, name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Span, "__init__", counting)
    return made


def hop(t: Tracer, name: str, parent: dict[str, str] | None, keep: bool = False) -> dict[str, str]:
    """One process's span of an invocation under `parent`, with a child of its own that ends
    first; the headers its next hop would get. Kept (a cold start), the child has a phase
    recorded under it, as a node records a start's phases."""
    with Scope(t, t.start(name, parent, deferrable=True)) as span:
        with Scope(t, t.start(f"{name}.inner")) as inner:
            if keep:
                t.record(f"{name}.phase", inner, 1, 2)  # type: ignore[arg-type]
            headers = tracing.headers(inner, BOTH)
        if keep:
            span.keep()
    return headers


def test_a_warm_invocation_left_out_by_the_ratio_builds_no_span_anywhere(built: list[str]) -> None:
    t, written = tracer()
    headers = hop(t, "client.invoke", None)
    assert headers["tracestate"] == OUR_MEMBER and headers["traceparent"].endswith("-00")
    headers = hop(t, "scheduler.invoke", headers)
    hop(t, "node.invoke", headers)
    t.shutdown()
    assert built == [] and written == [], "no span object made, nothing encoded or written"


def test_a_kept_invocation_is_exported_whole_with_the_ids_its_hops_already_sent(built: list[str]) -> None:
    t, written = tracer()
    with Scope(t, t.start("client.invoke", deferrable=True)) as client:
        to_node = hop(t, "scheduler.invoke", tracing.headers(client, BOTH), keep=True)
        client.keep()  # the node's reply said cold start
    t.shutdown()
    spans = {
        s["name"]: s
        for b in written
        for rs in b["resourceSpans"]
        for ss in rs["scopeSpans"]
        for s in ss["spans"]
    }
    assert set(spans) == {
        "client.invoke",
        "scheduler.invoke",
        "scheduler.invoke.inner",
        "scheduler.invoke.phase",
    }
    assert spans["scheduler.invoke"]["parentSpanId"] == f"{client.span_id:016x}"
    inner = spans["scheduler.invoke.inner"]
    assert inner["parentSpanId"] == spans["scheduler.invoke"]["spanId"]
    assert to_node["traceparent"][36:52] == inner["spanId"], "the next hop names the span that was kept"
    assert spans["scheduler.invoke.phase"]["parentSpanId"] == inner["spanId"]
    assert len(built) == 4


def test_a_failure_below_keeps_the_spans_above_it_in_the_process() -> None:
    t, written = tracer()
    with pytest.raises(RuntimeError):
        with Scope(t, t.start("scheduler.invoke", deferrable=True)):
            with Scope(t, t.start("scheduler.attempt")):
                raise RuntimeError("node lost")
    t.shutdown()
    assert names(written) == ["scheduler.attempt", "scheduler.invoke"]


def test_only_a_ratio_sampler_defers_and_only_invocations() -> None:
    t, _ = tracer()
    assert isinstance(t.start("client.invoke", deferrable=True), Deferred)
    assert isinstance(t.start("client.deploy"), Span), "control requests are always traced"
    off, _ = tracer({"OTEL_TRACES_SAMPLER": "always_off"})
    assert isinstance(off.start("client.invoke", deferrable=True), Unsampled)
    remote_unsampled = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}
    assert isinstance(t.start("s", remote_unsampled, deferrable=True), Unsampled), (
        "a caller that decided against tracing is followed"
    )
    t.shutdown()
    off.shutdown()


def test_children_held_for_a_deferred_parent_are_bounded() -> None:
    t, written = tracer()
    parent = t.start("node.invoke", deferrable=True)
    assert isinstance(parent, Deferred)
    held = [t.record("phase", parent, 1, 2) for _ in range(tracing.MAX_PENDING + 5)]
    assert sum(span is not None for span in held) == tracing.MAX_PENDING
    parent.keep()
    t.finish(parent)
    t.shutdown()
    assert len(names(written)) == tracing.MAX_PENDING + 1


def test_tracestate_and_baggage_cross_hops_and_baggage_becomes_attributes() -> None:
    t, written = tracer({"OTEL_TRACES_SAMPLER": "always_on", "OTEL_BSP_SCHEDULE_DELAY": "60000"})
    caller = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "vendor=abc,hetfaas=defer",
        "baggage": "user.id=42,deploy.region=eu%20west;prop=1,faas.name=spoofed",
    }
    with Scope(t, t.start("scheduler.invoke", caller, attributes={"faas.name": "echo"})) as span:
        onward = tracing.headers(span, BOTH)
    t.shutdown()
    assert onward["tracestate"] == "vendor=abc" and onward["baggage"] == caller["baggage"]
    (exported,) = [
        s for b in written for rs in b["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]
    ]
    attrs = {a["key"]: a["value"]["stringValue"] for a in exported["attributes"]}
    assert attrs == {"user.id": "42", "deploy.region": "eu west", "faas.name": "echo"}, (
        "baggage never overwrites the platform's own attributes"
    )
    assert exported["traceState"] == "vendor=abc"


def test_oversized_trace_context_is_dropped_not_the_request() -> None:
    headers = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": ",".join(f"v{n}=x" for n in range(200)),
        "baggage": "k=" + "x" * (propagation.MAX_BAGGAGE_BYTES + 1),
    }
    remote = propagation.extract(headers, BOTH)
    assert remote is not None and remote.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert remote.carried is not None and remote.carried.baggage == ""
    assert len(remote.carried.tracestate.split(",")) == propagation.MAX_TRACESTATE_MEMBERS
    off = propagation.propagators_from_env({"OTEL_PROPAGATORS": "tracecontext"})
    assert propagation.extract(headers, off).carried.baggage == ""  # type: ignore[union-attr]
    assert (
        propagation.extract(headers, propagation.propagators_from_env({"OTEL_PROPAGATORS": "none"})) is None
    )


def test_the_resource_follows_the_environment() -> None:
    from fabric import otlp

    env = {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,team=a%2Cb", "OTEL_SERVICE_NAME": "edge"}
    assert otlp.resource_attributes("host-1", env) == {
        "deployment.environment": "prod",
        "team": "a,b",
        "service.name": "edge",
        "service.instance.id": "host-1",
    }
    assert otlp.resource_attributes("host-1", {})["service.name"] == "host-1"


def test_protobuf_encoding_is_the_same_spans_as_json() -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    span = Span("phase", 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True, attributes={"n": 3})
    span.add_event("kernel.exec", {"pid": 7}, at_ns=span.start_ns + 5)
    span.set_error("boom")
    span.end_ns = span.start_ns + 10
    decoded = ExportTraceServiceRequest.FromString(otlp_proto.encode_spans({"service.name": "svc"}, [span]))
    (got,) = decoded.resource_spans[0].scope_spans[0].spans
    assert (
        got.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
        and got.parent_span_id.hex() == "b7ad6b7169203331"
    )
    assert got.attributes[0].key == "n" and got.attributes[0].value.int_value == 3
    assert got.events[0].name == "kernel.exec" and got.events[0].attributes[0].value.int_value == 7
    assert got.status.code == 2 and got.status.message == "boom"
    assert got.end_time_unix_nano - got.start_time_unix_nano == 10
