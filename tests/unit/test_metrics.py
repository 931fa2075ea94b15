"""The metrics registry and its two formats: Prometheus text and OTLP/JSON."""

from fabric.metrics import Registry


def registry() -> Registry:
    r = Registry()
    coldstarts = r.counter("faas.coldstarts", "Cold starts", ("faas.name",))
    duration = r.histogram("faas.invoke_duration", "Time on the node", ("faas.name",))
    r.gauge("hetfaas.pool.ready", "Ready slots", ("hetfaas.shard",), lambda: {("0",): 3, ("1",): 5})
    r.gauge("hetfaas.pool.created", "Created", (), lambda: {(): 7}, monotonic=True)
    coldstarts.add(("hello",))
    coldstarts.add(("hello",))
    for ms in (0.2, 3.0, 30_000.0):
        duration.record(("hello",), ms)
    return r


def test_prometheus_text() -> None:
    text = registry().prometheus()
    assert "# TYPE faas_coldstarts_total counter" in text
    assert 'faas_coldstarts_total{faas_name="hello"} 2' in text
    assert "# TYPE faas_invoke_duration_ms histogram" in text
    assert 'faas_invoke_duration_ms_bucket{faas_name="hello",le="0.25"} 1' in text
    assert 'faas_invoke_duration_ms_bucket{faas_name="hello",le="5"} 2' in text  # cumulative
    assert 'faas_invoke_duration_ms_bucket{faas_name="hello",le="+Inf"} 3' in text
    assert 'faas_invoke_duration_ms_count{faas_name="hello"} 3' in text
    assert 'hetfaas_pool_ready{hetfaas_shard="1"} 5' in text
    assert "# TYPE hetfaas_pool_created_total counter" in text and "hetfaas_pool_created_total 7" in text


def test_label_values_are_escaped() -> None:
    r = Registry()
    r.counter("c", "C", ("name",)).add(('a"b\\c',))
    assert 'c_total{name="a\\"b\\\\c"} 1' in r.prometheus()


def test_otlp_json() -> None:
    body = registry().otlp("host-1")
    [resource] = body["resourceMetrics"]
    assert resource["resource"]["attributes"] == [{"key": "service.name", "value": {"stringValue": "host-1"}}]
    metrics = {m["name"]: m for m in resource["scopeMetrics"][0]["metrics"]}
    assert metrics["faas.coldstarts"]["sum"]["isMonotonic"] is True
    assert metrics["faas.coldstarts"]["sum"]["dataPoints"][0]["asDouble"] == 2
    point = metrics["faas.invoke_duration"]["histogram"]["dataPoints"][0]
    assert point["count"] == "3" and point["bucketCounts"][0] == "1" and point["bucketCounts"][-1] == "1"
    assert len(point["bucketCounts"]) == len(point["explicitBounds"]) + 1
    assert {p["asDouble"] for p in metrics["hetfaas.pool.ready"]["gauge"]["dataPoints"]} == {3, 5}
    assert metrics["hetfaas.pool.created"]["sum"]["isMonotonic"] is True


def test_one_instrument_per_name() -> None:
    r = Registry()
    assert r.counter("c", "C", ()) is r.counter("c", "C", ())
