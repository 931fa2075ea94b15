"""Each function's recent invocations on a node (fabric/recent.py), bounded per function and in
functions, whatever tenants deploy."""

from fabric.recent import RecentInvocations
from schemas.messages import FunctionSpec, InvokeReply, NodeInvoke, error_reply


def call(tenant: str, name: str, n: int) -> NodeInvoke:
    spec = FunctionSpec(name=name, tenant=tenant, runtime="python", handler="main:handle")
    return NodeInvoke(
        invocation_id=f"i{n}", spec=spec, bundle_digest="sha256-" + "0" * 64, payload=b"", timeout_ms=1000
    )


def ok(n: int, cold: bool = False) -> InvokeReply:
    return InvokeReply(invocation_id=f"i{n}", node="host-1", cold_start=cold, duration_ms=1.5, output=b"")


def test_the_last_invocations_of_each_function_oldest_first() -> None:
    recent = RecentInvocations("host-1", per_function=3)
    recent.add(call("acme", "f", 0), ok(0, cold=True))
    for n in range(1, 4):
        recent.add(call("acme", "f", n), ok(n))
    recent.add(call("acme", "f", 4), error_reply("function_error", "x" * 500, "i4"))
    recent.add(call("other", "f", 5), ok(5))

    shown = recent.of("acme", "f")
    assert [r.invocation_id for r in shown] == ["i2", "i3", "i4"]
    assert shown[-1].error == "function_error" and len(shown[-1].message) == 200
    assert shown[-1].duration_ms is None and shown[0].duration_ms == 1.5
    assert [r.invocation_id for r in recent.of("other", "f")] == ["i5"], "tenants apart"
    assert recent.of("acme", "nothing") == []


def test_the_least_recently_invoked_function_is_forgotten_first() -> None:
    recent = RecentInvocations("host-1", max_functions=2)
    recent.add(call("t", "a", 0), ok(0))
    recent.add(call("t", "b", 1), ok(1))
    recent.add(call("t", "a", 2), ok(2))
    recent.add(call("t", "c", 3), ok(3))

    assert recent.of("t", "b") == [] and len(recent.of("t", "a")) == 2 and len(recent.of("t", "c")) == 1
