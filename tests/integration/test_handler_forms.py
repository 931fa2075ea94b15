"""The handler forms people port: handle(payload) as before, and handle(event, context) from
Lambda and OpenFaaS, with the payload decoded as JSON when the manifest says so, and a context
that names the invocation, its function and tenant, whether it was a cold start, and how long
it has left."""

import json
import re

import pytest

from cli.client import Client
from tests.integration.conftest import make_function

pytestmark = pytest.mark.integration

CONTEXTUAL = """
def handle(event, context):
    context.logger.info("handling %s", context.invocation_id)
    return {
        "event": event,
        "kind": type(event).__name__,
        "invocation_id": context.invocation_id,
        "function": context.function,
        "tenant": context.tenant,
        "cold_start": context.cold_start,
        "remaining_ms": context.remaining_ms(),
        "traceparent": context.traceparent,
    }
"""


async def test_an_event_and_context_handler_gets_json_and_its_invocation(
    client: Client, tenant: str, tmp_path
) -> None:
    manifest = 'runtime = "python"\nhandler = "main:handle"\npayload = "json"\ntimeout_ms = 5000\n'
    function = make_function(tmp_path, "lambda-style", manifest, {"main.py": CONTEXTUAL})
    await client.deploy(function, tenant=tenant)

    first = await client.invoke(tenant, "lambda-style", b'{"order": 7, "items": ["a", "b"]}')
    second = await client.invoke(tenant, "lambda-style", b"[1, 2]")
    not_json = await client.invoke(tenant, "lambda-style", b"not json")
    logs = await client.logs(tenant, "lambda-style")

    assert first.ok and second.ok, (first.error, second.error)
    one, two = json.loads(first.reply.output), json.loads(second.reply.output)
    assert one["event"] == {"order": 7, "items": ["a", "b"]} and two["event"] == [1, 2]
    assert one["invocation_id"] == first.invocation_id
    assert (one["function"], one["tenant"]) == ("lambda-style", tenant)
    assert (one["cold_start"], two["cold_start"]) == (True, False)
    assert 0 < two["remaining_ms"] <= 5000
    for answer in (one, two):  # the node's span of each invocation, for the handler's own spans
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]", answer["traceparent"]), answer
    assert one["traceparent"][3:35] != two["traceparent"][3:35], "each invocation its own trace"
    assert not not_json.ok and not_json.error.code == "function_error"
    assert "JSONDecodeError" in (not_json.error.detail or ""), not_json.error
    text = "\n".join(line for entry in logs.logs for line in entry.lines)
    assert f"INFO {tenant}/lambda-style: handling {first.invocation_id}" in text


BYTES_EVENT = (
    "def handle(event, context):\n    return {'kind': type(event).__name__, 'event': event.decode()}\n"
)
PAYLOAD = "def handle(payload):\n    return payload\n"


async def test_a_payload_handler_is_unchanged_and_an_event_handler_may_take_bytes(
    client: Client, tenant: str, tmp_path
) -> None:
    plain = 'runtime = "python"\nhandler = "main:handle"\n'
    await client.deploy(
        make_function(tmp_path, "bytes-event", plain, {"main.py": BYTES_EVENT}), tenant=tenant
    )
    await client.deploy(make_function(tmp_path, "payload", plain, {"main.py": PAYLOAD}), tenant=tenant)

    event = await client.invoke(tenant, "bytes-event", b"raw")
    payload = await client.invoke(tenant, "payload", b"raw")

    assert event.ok and json.loads(event.reply.output) == {"kind": "bytes", "event": "raw"}
    assert payload.ok and payload.reply.output == b"raw"
