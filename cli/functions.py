"""The commands about functions: deploy, rm, ls (get), describe, logs."""

import asyncio
import time
from pathlib import Path

import click
import msgspec

from cli import render
from cli.client import Client
from cli.context import TENANT_HELP, acting_as, run
from cli.observe import parse_duration
from cli.output import emit, output_option, structured
from schemas.messages import LogPosition, LogsReply

FOLLOW_EVERY_S = 1.0  # how often `logs -f` asks the nodes for what their logs gained


@click.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--tenant", default=None, help="deploy under this tenant instead of the manifest's")
@output_option
def deploy(path: Path, tenant: str | None, fmt: str) -> None:
    """Register the function in PATH (a directory holding function.toml, or the file itself).
    A python function's requirements are built into its dependency layer first (progress on
    stderr)."""
    reply = run(lambda c: c.deploy(path, tenant, progress=lambda line: click.echo(line, err=True)))
    if structured():
        emit(msgspec.to_builtins(reply))
        return
    spec = reply.function.spec
    verb = "deployed" if reply.updated else "unchanged"
    layer = f", layer {reply.function.layer_digest[:19]}" if reply.function.layer_digest else ""
    click.echo(
        f"{verb} {spec.tenant}/{spec.name} ({spec.runtime}, {reply.function.bundle_size} bytes, "
        f"{reply.function.bundle_digest[:19]}{layer}, revision {reply.revision})"
    )


@click.command("rm")
@click.argument("name")
@click.option("--tenant", default=None, help=TENANT_HELP)
@output_option
def remove(name: str, tenant: str | None, fmt: str) -> None:
    """Remove function NAME: no new invocations; those running finish; its idle instances stop
    (an eBPF function's program is unloaded). Its code stays in the bundle store."""
    reply = run(lambda c: c.remove(acting_as(c, tenant), name))
    if structured():
        emit(msgspec.to_builtins(reply))
        return
    spec = reply.function.spec
    click.echo(f"removed {spec.tenant}/{spec.name} ({reply.function.bundle_digest[:19]})")


@click.command("ls")
@click.option("--tenant", default=None, help="only this tenant's functions")
@output_option
def list_functions(tenant: str | None, fmt: str) -> None:
    """List deployed functions (`get` is the same)."""
    records = run(lambda c: c.functions(tenant))
    if structured():
        emit(msgspec.to_builtins(records))
    else:
        click.echo(render.functions_table(records, wide=fmt == "wide"))


get = click.Command(
    "get", callback=list_functions.callback, params=list_functions.params, help=list_functions.help
)


@click.command()
@click.argument("name")
@click.option("--tenant", default=None, help=TENANT_HELP)
@output_option
def describe(name: str, tenant: str | None, fmt: str) -> None:
    """Show function NAME in full: its spec, revision and code, the nodes where it is warm, and
    its recent invocations and errors (each node keeps its last 20)."""
    reply = run(lambda c: c.describe(acting_as(c, tenant), name))
    if structured():
        emit(msgspec.to_builtins(reply))
    else:
        click.echo(render.description(reply, time.time()))


@click.command()
@click.argument("name")
@click.option("--tenant", default=None, help=TENANT_HELP)
@click.option(
    "--tail", "lines", default=100, show_default=True, type=click.IntRange(1, 10_000), help="lines per node"
)
@click.option("--since", default=None, help="only lines written in the last DURATION (30s, 10m, 2h)")
@click.option("-f", "--follow", is_flag=True, help="then print new lines as they are written (Ctrl-C stops)")
@output_option
def logs(name: str, tenant: str | None, lines: int, since: str | None, follow: bool, fmt: str) -> None:
    """Print the last lines of function NAME's output (its stdout and stderr) from every host
    node that ran it, each line prefixed with its node when more than one did. Under -o json,
    -f prints one object per read."""
    since_unix = time.time() - parse_duration(since) if since else 0.0

    async def read(client: Client) -> None:
        acting = acting_as(client, tenant)
        reply = await client.logs(acting, name, lines, since=since_unix)
        if not reply.logs and not structured():
            click.echo(f"{acting}/{name} has written nothing yet", err=True)
        _print_logs(reply, multi=len(reply.logs) > 1, first=True)
        positions = _positions(reply)
        while follow:
            await asyncio.sleep(FOLLOW_EVERY_S)
            reply = await client.logs(acting, name, 10_000, after=positions)
            positions |= _positions(reply)
            _print_logs(reply, multi=len(positions) > 1, first=False)

    try:
        run(read)
    except KeyboardInterrupt:  # how -f is meant to end
        pass


def _positions(reply: LogsReply) -> dict[str, LogPosition]:
    return {logs.node: logs.position for logs in reply.logs if logs.position is not None}


def _print_logs(reply: LogsReply, multi: bool, first: bool) -> None:
    """Under -o json|yaml, one object per read: the first always, later ones when they hold lines."""
    if structured():
        if first or any(logs.lines for logs in reply.logs):
            emit(msgspec.to_builtins(reply))
        return
    for node_logs in reply.logs:
        prefix = f"{node_logs.node} | " if multi else ""
        if node_logs.truncated and not first:
            why = "rotated away before this read, or more than one read returns"
            click.echo(f"({node_logs.node}: lines left out: {why})", err=True)
        for line in node_logs.lines:
            click.echo(prefix + line)
