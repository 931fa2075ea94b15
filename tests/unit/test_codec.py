import msgspec
import pytest

from schemas import codec, keys, subjects
from schemas.errors import Error
from schemas.messages import (
    ErrorReply,
    FunctionRecord,
    FunctionRemoved,
    FunctionSpec,
    Heartbeat,
    InvokeReply,
    InvokeRequest,
    LogsReply,
    LogsRequest,
    NodeInvoke,
    NodeLogs,
    RemoveFunction,
    function_of,
    instance_key,
)

SPEC = FunctionSpec(name="fn", runtime="python", tenant="acme", handler="m:f")


@pytest.mark.parametrize(
    ("message", "decoder"),
    [
        (
            InvokeRequest(invocation_id="i", tenant="acme", function="fn", payload=b"\x00\xff"),
            codec.invoke_request,
        ),
        (
            NodeInvoke(invocation_id="i", spec=SPEC, bundle_digest="sha256-x", payload=b"", timeout_ms=5),
            codec.node_invoke,
        ),
        (
            Heartbeat(node_id="h", seq=3, inflight=1, capacity=8, instances=2, warm_idle={"k": 1}),
            codec.heartbeat,
        ),
        (
            FunctionRecord(spec=SPEC, bundle_digest="sha256-x", bundle_size=3, deployed_at=1.5),
            codec.function_record,
        ),
        (RemoveFunction(tenant="acme", name="fn"), codec.remove_function),
        (FunctionRemoved(tenant="acme", name="fn"), codec.function_removed),
        (LogsRequest(tenant="acme", function="fn", lines=5), codec.logs_request),
        (LogsReply(logs=[NodeLogs(node="h", lines=["a", "b"], truncated=True)]), codec.logs_result),
    ],
)
def test_round_trip(message: msgspec.Struct, decoder: msgspec.msgpack.Decoder) -> None:
    assert decoder.decode(codec.encode(message)) == message


def test_a_reply_decoder_tells_results_from_errors() -> None:
    ok = InvokeReply(invocation_id="i", node="h", cold_start=True, duration_ms=1.0, output=b"x")
    err = ErrorReply(error=Error(code="timeout", message="slow"), invocation_id="i")
    assert codec.invoke_result.decode(codec.encode(ok)) == ok
    assert codec.invoke_result.decode(codec.encode(err)) == err


def test_new_fields_from_a_newer_peer_are_ignored() -> None:
    newer = {"type": "invoke", "invocation_id": "i", "tenant": "t", "function": "f", "priority": 7}
    decoded = codec.invoke_request.decode(msgspec.msgpack.encode(newer))
    assert decoded.function == "f" and decoded.timeout_ms == 30_000


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "invoke", "invocation_id": 1, "tenant": "t", "function": "f"},
        {"type": "deploy", "spec": {}},
        {"type": "invoke", "invocation_id": "i", "tenant": "t"},
    ],
)
def test_wrong_types_and_tags_are_rejected(raw: dict) -> None:
    with pytest.raises(msgspec.ValidationError):
        codec.invoke_request.decode(msgspec.msgpack.encode(raw))


def test_unknown_error_codes_are_rejected() -> None:
    with pytest.raises(msgspec.ValidationError):
        codec.invoke_result.decode(
            msgspec.msgpack.encode({"type": "error", "error": {"code": "x", "message": "m"}})
        )


def test_subjects_and_keys() -> None:
    assert subjects.invoke("acme", "fn") == "hetfaas.invoke.acme.fn"
    assert subjects.parse_invoke("hetfaas.invoke.acme.fn") == ("acme", "fn")
    assert subjects.parse_invoke("hetfaas.invoke.acme") is None
    assert keys.function("acme", "fn") == "/hetfaas/functions/acme/fn"
    assert keys.parse_function(keys.function("acme", "fn")) == ("acme", "fn")
    assert keys.parse_program(keys.program("sha256-ab", "acme", "fn")) == ("sha256-ab", "acme", "fn")
    assert function_of(instance_key("acme", "fn", "sha256-ab")) == "acme/fn"
