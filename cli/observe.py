"""`hetfaas trace` and `hetfaas coldstarts`: what the spans of the local cluster (its files) or a
planned cluster (its trace stream) say about invocations and cold starts."""

import time
from pathlib import Path

import click

from cli import render, traces
from cli.context import run, state_dir
from cli.output import CommandError, emit, output_option, structured
from deploy import launcher
from fabric import trace_stream

TRACE_WAIT_S = 10.0  # services export spans every second (OTEL_BSP_SCHEDULE_DELAY)


def _traces_dir() -> Path:
    traces = state_dir() / "traces"
    if not traces.is_dir():
        raise CommandError(
            "not_found",
            f"no traces in {state_dir()}: `hetfaas trace` reads the local cluster's OTLP-JSON files "
            "(with OTEL_EXPORTER_OTLP_ENDPOINT set, spans go to your collector instead)",
        )
    return traces


TRACE_WINDOW_S = 3600.0  # how far back `hetfaas trace` looks in a planned cluster's trace stream


def _spans(since_s: float = TRACE_WINDOW_S) -> list[traces.Span]:
    """The local files' spans (the CLI's own, and a local cluster's), and a planned cluster's
    from its trace stream (every machine's services publish there)."""
    spans = traces.read_spans(_traces_dir())
    info = launcher.read_cluster(state_dir())
    if info is not None and info.planned:
        spans += traces.decode_batches(run(lambda c: c.trace_batches(since_s)))
    return spans


HOPS = {"scheduler.invoke", "scheduler.attempt", "node.invoke"}


def wait_for_trace(invocation_id: str) -> str:
    """The waterfall once every hop's spans have been exported (services flush every second)."""
    deadline = time.monotonic() + TRACE_WAIT_S
    while True:
        spans = traces.trace_of(_spans(), invocation_id)
        if HOPS <= {s.name for s in spans} or time.monotonic() > deadline:
            return traces.waterfall(spans) or f"no trace found for {invocation_id}"
        time.sleep(0.2)


@click.command()
@click.argument("invocation_id")
@output_option
def trace(invocation_id: str, fmt: str) -> None:
    """Draw an invocation's trace as a waterfall: each hop and phase, where it ran, how long."""
    spans = traces.trace_of(_spans(), invocation_id)
    if not spans:
        raise CommandError("not_found", f"no trace for invocation {invocation_id} in {_traces_dir()}")
    if structured():
        emit([traces.span_json(s) for s in spans])
    else:
        click.echo(traces.waterfall(spans))


@click.command()
@click.option("--function", "function", default=None, help="only this function's cold starts")
@click.option("--since", default=None, help="only the last DURATION (30s, 10m, 2h, 1d)")
@output_option
def coldstarts(function: str | None, since: str | None, fmt: str) -> None:
    """Summarise cold starts: how many, p50/p99 of each phase, its share of the time, by pool mode."""
    since_s = parse_duration(since) if since else trace_stream.MAX_AGE_S
    since_ns = time.time_ns() - round(since_s * 1e9) if since else 0
    summary = traces.cold_starts(_spans(since_s), function, since_ns)
    rows = traces.cold_start_rows(summary)
    if structured():
        emit(rows)
    elif not rows:
        click.echo(
            "no cold starts traced"
            + (f" for {function}" if function else "")
            + (f" in the last {since}" if since else "")
        )
    else:
        click.echo(render.cold_start_table(rows))


def parse_duration(text: str) -> float:
    """Seconds in "30s", "10m", "2h", "1d" (a bare number is seconds)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1:] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a duration like 30s, 10m, 2h or 1d") from None
