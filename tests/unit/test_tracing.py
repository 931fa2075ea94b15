"""The tracer: trace context, samplers, unsampled spans, OTLP/JSON export."""

import json
import threading

from fabric import otlp
from fabric.propagation import parse_traceparent
from fabric.sampling import DEFER, DROP, SAMPLE, sampler_from_env
from fabric.span_export import BatchExporter
from fabric.tracing import Scope, Span, Tracer, Unsampled, current_context

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def tracer(sampler: str = "parentbased_always_on", arg: str = "1.0") -> tuple[Tracer, list[dict]]:
    written: list[dict] = []
    env = {"OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": arg, "OTEL_BSP_SCHEDULE_DELAY": "60000"}
    exporter = BatchExporter("svc", lambda body: written.append(json.loads(body)), env)
    return Tracer(exporter, sampler_from_env(env)), written


def exported(written: list[dict]) -> list[dict]:
    return [
        s for body in written for rs in body["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]
    ]


def test_traceparent_parsing() -> None:
    assert parse_traceparent(PARENT) == (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True)
    for bad in (
        "",
        "00-abc-def-01",
        "00-" + "0" * 32 + "-b7ad6b7169203331-01",
        "00-zz" + "0" * 30 + "-b7ad6b7169203331-01",
    ):
        assert parse_traceparent(bad) is None, bad


def test_a_span_continues_the_callers_trace_and_nests_locally() -> None:
    t, written = tracer()
    with Scope(t, t.start("server", {"traceparent": PARENT})) as server:
        with Scope(t, t.start("inner")) as inner:
            assert current_context() is inner
        t.record(
            "phase",
            server,
            server.start_ns,
            server.start_ns + 10,
            {"k": 1},
            [("evt", server.start_ns + 5, {"a": "b"})],
        )
    t.shutdown()

    spans = {s["name"]: s for s in exported(written)}
    assert spans["server"]["traceId"] == "0af7651916cd43dd8448eb211c80319c"
    assert spans["server"]["parentSpanId"] == "b7ad6b7169203331"
    assert spans["inner"]["parentSpanId"] == spans["phase"]["parentSpanId"] == spans["server"]["spanId"]
    assert spans["phase"]["events"][0]["name"] == "evt"
    assert spans["phase"]["attributes"] == [{"key": "k", "value": {"intValue": "1"}}]


def test_errors_end_the_span_in_error() -> None:
    t, written = tracer()
    try:
        with Scope(t, t.start("boom")):
            raise ValueError("no")
    except ValueError:
        pass
    t.shutdown()
    assert exported(written)[0]["status"] == {"code": 2, "message": "ValueError: no"}


def test_unsampled_spans_record_nothing_and_carry_the_decision_on() -> None:
    t, written = tracer("parentbased_always_off")
    root = t.start("root", deferrable=True)
    assert isinstance(root, Unsampled) and root.traceparent().endswith("-00")
    with Scope(t, root):
        child = t.start("child")
        assert isinstance(child, Unsampled) and child.trace_id == root.trace_id
    remote_sampled = t.start("server", {"traceparent": PARENT})
    assert isinstance(remote_sampled, Span), "parent-based: a sampled caller's trace is sampled here"
    t.finish(remote_sampled)
    t.shutdown()
    assert [s["name"] for s in exported(written)] == ["server"]


def test_samplers() -> None:
    always_off = sampler_from_env({"OTEL_TRACES_SAMPLER": "always_off"})
    ratio = sampler_from_env({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"})
    assert always_off(123, SAMPLE, True) == DROP and always_off(123, None, True) == DROP
    assert ratio(1, None, False) == SAMPLE and ratio((1 << 64) - 1, None, False) == SAMPLE, (
        "a control request's trace (not deferrable) is always kept"
    )
    assert ratio((1 << 64) - 1, None, True) == DEFER, "an invocation the ratio leaves out waits for its end"
    assert ratio(1, DROP, True) == SAMPLE, "not parent-based: the parent's flag does not count"
    default = sampler_from_env({})
    assert default((1 << 64) - 1, None, True) == DEFER and default(1, None, True) == SAMPLE
    assert default(1, DROP, True) == DROP and default(1, DEFER, True) == DEFER, "parent-based by default"
    assert sampler_from_env({"OTEL_TRACES_SAMPLER": "nonsense"})(1, None, True) == SAMPLE


def test_attribute_values_are_encoded_as_otlp_json_says() -> None:
    t, written = tracer()
    attributes = {"s": "x", "b": True, "f": False, "i": 7, "d": 0.5, "a": ["p", 2], "o": None}
    with Scope(t, t.start("root", attributes=attributes)):
        pass
    t.shutdown()
    (span,) = exported(written)
    assert "parentSpanId" not in span and "events" not in span and span["status"] == {"code": 0}
    assert span["kind"] == 1 and int(span["endTimeUnixNano"]) >= int(span["startTimeUnixNano"]) > 0
    assert {kv["key"]: kv["value"] for kv in span["attributes"]} == {
        "s": {"stringValue": "x"},
        "b": {"boolValue": True},
        "f": {"boolValue": False},
        "i": {"intValue": "7"},
        "d": {"doubleValue": 0.5},
        "a": {"arrayValue": {"values": [{"stringValue": "p"}, {"intValue": "2"}]}},
        "o": {"stringValue": "None"},
    }
    resource = written[0]["resourceSpans"][0]["resource"]
    assert resource == {
        "attributes": [
            {"key": "service.name", "value": {"stringValue": "svc"}},
            {"key": "service.instance.id", "value": {"stringValue": "svc"}},
        ]
    }


def test_repeated_attributes_keep_their_types() -> None:
    """Encoded attribute pairs are reused across spans; True, 1 and 1.0 are equal as dict keys
    but not as OTLP values."""
    t, written = tracer()
    for value in (True, 1, 1.0, "1", True):
        with Scope(t, t.start("s", attributes={"k": value})):
            pass
    t.shutdown()
    values = [s["attributes"][0]["value"] for s in exported(written)]
    assert values == [
        {"boolValue": True},
        {"intValue": "1"},
        {"doubleValue": 1.0},
        {"stringValue": "1"},
        {"boolValue": True},
    ]


def finished_span(name: str) -> Span:
    span = Span(name, 1, 0, True)
    span.end_ns = span.start_ns + 1
    return span


def test_a_full_batch_is_encoded_at_once_and_written_off_the_producing_thread() -> None:
    writes: list[tuple[str, list[str]]] = []
    written = threading.Event()

    def write(body: bytes) -> None:
        writes.append((threading.current_thread().name, [s["name"] for s in exported([json.loads(body)])]))
        written.set()

    env = {"OTEL_BSP_SCHEDULE_DELAY": "600000", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "3"}
    exporter = BatchExporter("svc", write, env)
    for name in ("a", "b", "c", "d"):
        exporter.add(finished_span(name))
    assert written.wait(10), "a full batch does not wait out the 10-minute delay"
    assert writes[0] == ("span-export-svc", ["a", "b", "c"])
    exporter.shutdown()
    assert [name for _, names in writes for name in names] == ["a", "b", "c", "d"], "the rest follows"
    assert {thread for thread, _ in writes} == {"span-export-svc"}


def test_a_failing_writer_costs_its_batch_and_a_slow_one_bounded_memory() -> None:
    release, calls = threading.Event(), []

    def write(body: bytes) -> None:
        calls.append(len(exported([json.loads(body)])))
        if len(calls) == 1:
            raise OSError("backend down")
        release.wait(10)  # a backend that hangs

    env = {"OTEL_BSP_MAX_QUEUE_SIZE": "4", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2"}
    exporter = BatchExporter("svc", write, env)
    for name in "abcdefghijklmnop":
        exporter.add(finished_span(name))
    release.set()
    exporter.shutdown()
    assert calls[0] == 2 and sum(calls) + exporter.dropped == 16, "every span written or counted dropped"
    assert exporter.dropped > 0, "what the hung writer could not take was dropped, not queued without end"


def test_invocation_ids_are_encoded_but_not_kept_so_the_repeated_pairs_stay() -> None:
    t, written = tracer()
    for n in range(3):
        with Scope(t, t.start("s", attributes={"faas.invocation_id": f"i-{n}", "faas.name": "echo"})):
            pass
    t.shutdown()
    ids = [s["attributes"][0]["value"]["stringValue"] for s in exported(written)]
    assert ids == ["i-0", "i-1", "i-2"]
    assert not any(key == "faas.invocation_id" for key, _, _ in otlp._cached)
    assert ("faas.name", "echo", str) in otlp._cached
