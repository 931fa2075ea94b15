"""The metrics registry and its two formats: Prometheus text and OTLP/JSON."""

from fabric.metrics import MAX_SERIES, OVERFLOW, Registry


def registry() -> Registry:
    r = Registry()
    coldstarts = r.counter("faas.coldstarts", "Cold starts", ("faas.name",))
    duration = r.histogram("faas.invoke_duration", "Time on the node", ("faas.name",))
    r.gauge("hetfaas.pool.ready", "Ready slots", ("hetfaas.shard",), lambda: {("0",): 3, ("1",): 5})
    r.gauge("hetfaas.pool.created", "Created", (), lambda: {(): 7}, monotonic=True)
    coldstarts.add(("hello",))
    coldstarts.add(("hello",))
    for seconds in (0.0002, 0.003, 30.0):
        duration.record(("hello",), seconds)
    return r


def test_prometheus_text() -> None:
    text = registry().prometheus()
    assert "# TYPE faas_coldstarts_total counter" in text
    assert 'faas_coldstarts_total{faas_name="hello"} 2' in text
    assert "# TYPE faas_invoke_duration_seconds histogram" in text
    assert 'faas_invoke_duration_seconds_bucket{faas_name="hello",le="0.00025"} 1' in text
    assert 'faas_invoke_duration_seconds_bucket{faas_name="hello",le="0.005"} 2' in text  # cumulative
    assert 'faas_invoke_duration_seconds_bucket{faas_name="hello",le="+Inf"} 3' in text
    assert 'faas_invoke_duration_seconds_count{faas_name="hello"} 3' in text
    assert 'hetfaas_pool_ready{hetfaas_shard="1"} 5' in text
    assert "# TYPE hetfaas_pool_created_total counter" in text and "hetfaas_pool_created_total 7" in text


def test_label_values_are_escaped() -> None:
    r = Registry()
    r.counter("c", "C", ("name",)).add(('a"b\\c',))
    assert 'c_total{name="a\\"b\\\\c"} 1' in r.prometheus()


def test_otlp_json() -> None:
    body = registry().otlp("host-1")
    [resource] = body["resourceMetrics"]
    attributes = {a["key"]: a["value"]["stringValue"] for a in resource["resource"]["attributes"]}
    assert attributes["service.name"] == "host-1"
    metrics = {m["name"]: m for m in resource["scopeMetrics"][0]["metrics"]}
    assert metrics["faas.invoke_duration"]["unit"] == "s"
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


def test_units_name_the_prometheus_series() -> None:
    r = Registry()
    r.gauge("hetfaas.function.memory", "RSS", ("f",), lambda: {("a",): 1024}, unit="By")
    r.gauge("hetfaas.function.cpu_time", "CPU", ("f",), lambda: {("a",): 1.5}, monotonic=True, unit="s")
    r.counter("faas.invocations", "Calls", ("f",), unit="{invocation}").add(("a",))
    text = r.prometheus()
    assert 'hetfaas_function_memory_bytes{f="a"} 1024' in text
    assert "# TYPE hetfaas_function_cpu_time_seconds_total counter" in text
    assert 'hetfaas_function_cpu_time_seconds_total{f="a"} 1.5' in text
    assert 'faas_invocations_total{f="a"} 1' in text, "an annotation such as {invocation} adds no word"


def test_label_sets_past_the_limit_add_up_under_one_overflow_set() -> None:
    r = Registry()
    calls = r.counter("faas.invocations", "Calls", ("faas.name",))
    durations = r.histogram("faas.invoke_duration", "Time", ("faas.name",))
    for n in range(MAX_SERIES + 50):
        calls.add((f"f{n}",))
        durations.record((f"f{n}",), 0.001)
    calls.add(("f0",))  # a set kept before the limit still counts on its own

    assert len(calls.values) == MAX_SERIES + 1 and len(durations.buckets) == MAX_SERIES + 1
    assert calls.values[(OVERFLOW,)] == 50 and calls.values[("f0",)] == 2
    assert sum(durations.buckets[(OVERFLOW,)]) == 50
