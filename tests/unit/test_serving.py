"""A route that names its span (`bus.Traced`): dispatch runs the handler in it, under the
caller's trace, and the handler holds no span code of its own."""

from pathlib import Path

import pytest

from cli.traces import read_spans
from fabric import bus, telemetry
from schemas import codec
from schemas.messages import ErrorReply, FunctionList, ListFunctions, error_reply

TRACE_ID, CALLER = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
PARENT = f"00-{TRACE_ID}-{CALLER}-01"


async def handle(req: ListFunctions, ctx: bus.Context) -> FunctionList | ErrorReply:
    if req.tenant == "broken":
        raise RuntimeError("injected")
    if req.tenant == "nobody":
        return error_reply("not_found", "no such tenant")
    return FunctionList(functions=[])


ROUTE = bus.Route(
    "svc.list",
    codec.list_functions,
    handle,
    span=bus.Traced("svc.list", lambda req: {"hetfaas.tenant": req.tenant or ""}),
)


@pytest.fixture
def traces(tmp_path: Path):
    telemetry.setup_tracing("svc", str(tmp_path), True)
    try:
        yield tmp_path / "traces"
    finally:
        telemetry.stop_tracing()


async def dispatched(tenant: str) -> object:
    ctx = bus.Context(subject="svc.list", headers={"traceparent": PARENT}, received_at=0.0, reply="")
    return await bus.dispatch(ROUTE, codec.encode(ListFunctions(tenant=tenant)), ctx)


async def test_the_handler_runs_in_the_route_s_span_under_the_caller(traces: Path) -> None:
    replies = [await dispatched(tenant) for tenant in ("someone", "nobody", "broken")]
    telemetry.stop_tracing()  # flushes

    assert isinstance(replies[0], FunctionList)
    assert isinstance(replies[1], ErrorReply) and replies[1].error.code == "not_found"
    assert isinstance(replies[2], ErrorReply) and replies[2].error.code == "internal"
    spans = {s.attributes["hetfaas.tenant"]: s for s in read_spans(traces)}
    assert set(spans) == {"someone", "nobody", "broken"}
    assert all((s.name, s.trace_id, s.parent_id) == ("svc.list", TRACE_ID, CALLER) for s in spans.values())
    assert spans["someone"].error == ""
    assert "not_found: no such tenant" in spans["nobody"].error, "an error reply marks the span failed"
    assert "injected" in spans["broken"].error, "so does a handler that raised"


async def test_with_tracing_off_the_handler_runs_alone(tmp_path: Path) -> None:
    assert not telemetry.enabled()
    assert isinstance(await dispatched("someone"), FunctionList)
    assert not (tmp_path / "traces").exists()


def test_a_route_may_take_its_reply_subject_from_a_header() -> None:
    """A hand-over between replicas carries the caller's reply in a header (no client may pass an
    `_R_.` reply on as its own); the route answers there, and a tenant route still checks it."""
    seen: list[str] = []

    def record(req: ListFunctions, ctx: bus.Context) -> None:
        seen.append(ctx.reply)

    server = bus.Server(nc=None, max_concurrent=1)  # type: ignore[arg-type]  # inline: no I/O
    route = bus.Route("hetfaas.invoke.alice.f", codec.list_functions, record, inline=True, reply_header="R")
    deliver = server._deliverer(route)
    body = codec.encode(ListFunctions(tenant="alice"))
    deliver("hetfaas.invoke.alice.f", "", body, {"R": "_R_.abc.def"})
    deliver("hetfaas.invoke.alice.f", "_INBOX.alice.1", body, None)
    assert seen == ["_R_.abc.def", "_INBOX.alice.1"]
    checked = bus.Route(
        "hetfaas.invoke.alice.f",
        codec.list_functions,
        record,
        inline=True,
        reply_header="R",
        tenant_reply=True,
    )
    server._deliverer(checked)("hetfaas.invoke.alice.f", "", body, {"R": "_INBOX.bob.1"})
    assert seen == ["_R_.abc.def", "_INBOX.alice.1"] and server.foreign_replies == 1
