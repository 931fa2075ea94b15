"""`hetfaas invoke` (and `--async`), `hetfaas result ID`: an invocation's answer as its output on
stdout, or one object under -o json|yaml, and an exit status per outcome (cli/output.py)."""

import base64
import sys
import time
from typing import IO, Any

import click

from cli import async_results, observe, render
from cli.client import RETRY_AFTER_MS, next_invocation_id
from cli.context import TENANT_HELP, acting_as, ca, creds, nats_url, run, state_dir
from cli.output import CommandError, emit, exit_for, output_option, structured

RESULT_POLL_S = 0.1


@click.command()
@click.argument("name")
@click.option("--tenant", default=None, help=TENANT_HELP)
@click.option("--data", help="payload text")
@click.option("--data-file", type=click.File("rb"), help="payload file ('-' for stdin)")
@click.option("--timeout-ms", default=30_000, show_default=True, type=click.IntRange(1, 900_000))
@click.option(
    "--retry-after-ms",
    default=RETRY_AFTER_MS,
    show_default=True,
    type=click.IntRange(0, 900_000),
    help="send the invocation again (same id) if unanswered this long, then after 2x, 4x...; 0: never",
)
@click.option(
    "--async", "in_background", is_flag=True, help="print its id at once; `hetfaas result ID` later"
)
@output_option
@click.option("-v", "--verbose", is_flag=True, help="also print node, cold/warm and latency to stderr")
@click.option("--trace", "show_trace", is_flag=True, help="then draw the invocation's trace (stderr)")
def invoke(
    name: str,
    tenant: str | None,
    data: str | None,
    data_file: IO[bytes] | None,
    timeout_ms: int,
    retry_after_ms: int,
    in_background: bool,
    fmt: str,
    verbose: bool,
    show_trace: bool,
) -> None:
    """Invoke function NAME; the payload is --data, --data-file, or stdin when it is not a terminal."""
    payload = _payload(data, data_file)
    if in_background:
        if show_trace or verbose:
            raise click.UsageError("--async prints the id only: ask `hetfaas result ID` (and `trace ID`)")
        _submit(name, tenant, payload, timeout_ms, retry_after_ms)
        return
    outcome = run(
        lambda c: c.invoke(acting_as(c, tenant), name, payload, timeout_ms, retry_after_ms=retry_after_ms),
        trace_all=show_trace,
    )
    result = render.invoke_json(outcome)
    unterminated = show(result, stop=False)
    if verbose:
        click.echo(("\n" if unterminated else "") + render.invoke_summary(outcome), err=True)
    if show_trace:
        separator = "\n" if unterminated and not verbose else ""
        click.echo(separator + observe.wait_for_trace(outcome.invocation_id), err=True)
    if not outcome.ok:
        exit_for(outcome.error.code)


def _payload(data: str | None, data_file: IO[bytes] | None) -> bytes:
    if data is not None and data_file is not None:
        raise click.UsageError("give --data or --data-file, not both")
    if data is not None:
        return data.encode()
    if data_file is not None:
        return data_file.read()
    return b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()


def show(result: dict[str, Any], stop: bool = True) -> bool:
    """An answer (render.invoke_json's form) as the format says: the output byte for byte, or an
    error on stderr; one object under -o json|yaml. Whether stdout was left without a final
    newline (what a later line on stderr must start with). `stop`: exit with its status."""
    error = result.get("error")
    if structured():
        emit(result)
    elif error is None:
        output = _output_bytes(result)
        sys.stdout.buffer.write(output)
        if output and not output.endswith(b"\n") and sys.stdout.isatty():
            sys.stdout.write("\n")
        sys.stdout.flush()
        # Output without a final newline, then stderr into the same pipe: start stderr on a line
        # of its own (stdout itself stays byte for byte what the function returned).
        return bool(output) and not output.endswith(b"\n") and not sys.stdout.isatty()
    else:
        click.echo(f"error: {error['code']}: {error['message']}", err=True)
        if error.get("detail"):
            click.echo(error["detail"].rstrip(), err=True)
    if stop and error is not None:
        exit_for(error["code"])
    return False


def _output_bytes(result: dict[str, Any]) -> bytes:
    output = result.get("output") or ""
    return base64.b64decode(output) if result.get("output_encoding") == "base64" else output.encode()


def _submit(name: str, tenant: str | None, payload: bytes, timeout_ms: int, retry_after_ms: int) -> None:
    invocation_id = next_invocation_id()
    request = {
        "invocation_id": invocation_id,
        "function": name,
        "tenant": tenant,
        "timeout_ms": timeout_ms,
        "retry_after_ms": retry_after_ms,
        "submitted_at": time.time(),
    }
    async_results.submit(state_dir(), request, payload, _identity_env())
    if structured():
        emit({"invocation_id": invocation_id, "status": "pending"})
    else:
        click.echo(invocation_id)


def _identity_env() -> dict[str, str]:
    """What the waiter needs to act as this command does: the cluster and the identity chosen."""
    return {"HETFAAS_NATS_URL": nats_url(), "HETFAAS_CREDS": creds(), "HETFAAS_CA": ca()} | {
        "HETFAAS_STATE_DIR": str(state_dir())
    }


@click.command("_await", hidden=True)
@click.argument("invocation_id")
def await_result(invocation_id: str) -> None:
    """The waiter of an --async invocation: sends it (the same id, however often it is started)
    and records its answer."""
    state = state_dir()
    record = async_results.read(state, invocation_id)
    if record is None or record.get("status") != "pending":
        return
    request = record["request"]
    try:
        outcome = run(
            lambda c: c.invoke(
                acting_as(c, request["tenant"]),
                request["function"],
                async_results.payload(state, invocation_id),
                request["timeout_ms"],
                invocation_id=invocation_id,
                retry_after_ms=request["retry_after_ms"],
            )
        )
        result = render.invoke_json(outcome)
    except CommandError as exc:
        result = {
            "ok": False,
            "invocation_id": invocation_id,
            "error": {"code": exc.code, "message": exc.text},
        }
    async_results.finish(state, invocation_id, result)


@click.command()
@click.argument("invocation_id")
@click.option("--wait", "wait_s", type=click.FloatRange(0), default=0, help="wait up to this many seconds")
@output_option
def result(invocation_id: str, wait_s: float, fmt: str) -> None:
    """The answer of an invocation made with `invoke --async`: its output (or -o json), or
    "pending" (exit status 0, -o json: {"status": "pending"}) while it runs."""
    state = state_dir()
    deadline = time.monotonic() + wait_s
    while True:
        record = async_results.read(state, invocation_id)
        if record is None:
            raise CommandError("not_found", f"no invocation {invocation_id!r} made with --async here")
        if record["status"] == "done":
            show(record["result"])
            return
        if not async_results.waiter_alive(record):  # it died: another sends it again (same id)
            async_results.start_waiter(state, invocation_id, record.get("env", {}))
        if time.monotonic() >= deadline:
            break
        time.sleep(RESULT_POLL_S)  # polling a file another process writes
    if structured():
        emit({"invocation_id": invocation_id, "status": "pending"})
    else:
        click.echo(f"{invocation_id} is pending", err=True)
