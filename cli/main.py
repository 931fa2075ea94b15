"""`hetfaas`: the command line. Thin: argument parsing and printing around `cli.client`."""

import logging
import os
import sys
import time
from pathlib import Path
from typing import IO

import click
import msgspec

from cli import account, cluster, maps, nodes, render, tenants, traces
from cli.client import RETRY_AFTER_MS, Client
from cli.context import TENANT_HELP, acting_as, print_json, run, state_dir
from deploy import launcher
from deploy.services import ServiceError
from fabric import trace_stream
from fabric.runner import quiet_tls_close
from schemas.ebpf import PROG_TYPES, VerifyRequest

UP_TIMEOUT_S = 60.0


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hetfaas")
@click.option(
    "--creds",
    type=click.Path(dir_okay=False),
    default=None,
    help="NATS credentials file to act as (default: $HETFAAS_CREDS, else the local cluster's operator)",
)
@click.option(
    "--ca",
    type=click.Path(dir_okay=False),
    default=None,
    help="CA file of a cluster whose NATS speaks TLS (default: $HETFAAS_CA, else the local cluster's)",
)
@click.option(
    "--context",
    type=click.Path(file_okay=False),
    default=None,
    help="a planned cluster's operator directory, DIR/operator (default: $HETFAAS_CONTEXT)",
)
def cli(creds: str | None, ca: str | None, context: str | None) -> None:
    """hetfaas: serverless functions on CPU hosts and DPUs.

    The cluster is found through --context or $HETFAAS_CONTEXT (a planned cluster's
    DIR/operator), else $HETFAAS_NATS_URL, else the state directory of `hetfaas up`
    ($HETFAAS_STATE_DIR, default ~/.local/state/hetfaas). Every command acts as the identity in
    its credentials: a tenant's act only for that tenant.
    """


@cli.command()
@click.option("--hosts", default=2, show_default=True, type=click.IntRange(1, 64), help="host nodes to start")
@click.option(
    "--schedulers", default=1, show_default=True, type=click.IntRange(1, 16), help="scheduler replicas"
)
@click.option(
    "--verifiers",
    default=1,
    show_default=True,
    type=click.IntRange(0, 8),
    help="eBPF verifier replicas (root)",
)
@click.option(
    "--dpus", default=0, show_default=True, type=click.IntRange(0, 64), help="DPU nodes to start (root)"
)
@click.option(
    "--tls/--no-tls",
    "use_tls",
    default=False,
    show_default=True,
    help="clients reach NATS and etcd over TLS (a CA and certificate are made in the state directory)",
)
def up(hosts: int, schedulers: int, verifiers: int, dpus: int, use_tls: bool) -> None:
    """Start a local cluster in the background; returns when every node has registered.
    Secured: every connection to NATS and etcd authenticates, each identity with only its
    role's permissions; the operator's credentials are kept in the state directory."""
    state = state_dir()
    info = launcher.read_cluster(state)
    if info and info.processes and all(launcher.running_processes(info).values()):
        running_hosts = sum(name.startswith("host-") for name in info.processes)
        click.echo(
            f"cluster already running with {running_hosts} host node(s) (state directory {state}); "
            "`hetfaas down` stops it"
            + (", then `up` again to change its size" if running_hosts != hosts else "")
        )
        return
    if info and info.processes:
        launcher.stop(info, progress=lambda m: click.echo(f"  {m} (left over)", err=True))
    try:
        info = launcher.up(
            state,
            hosts=hosts,
            schedulers=schedulers,
            verifiers=verifiers,
            dpus=dpus if os.geteuid() == 0 else 0,
            progress=lambda m: click.echo(f"  {m}", err=True),
            use_tls=use_tls,
        )
    except ServiceError as exc:
        raise click.ClickException(str(exc)) from None
    nodes = hosts + (dpus if os.geteuid() == 0 else 0)
    click.echo(f"  waiting for {nodes} node(s) to register", err=True)
    status = run(_wait_for_nodes, nodes, info)
    click.echo(render.status_table(status, state, launcher.running_processes(info)))
    click.echo(
        f"\ncluster is up: NATS {info.nats_url}, etcd {info.etcd_endpoint}; stop it with `hetfaas down`"
    )
    if info.nats_ca:
        click.echo(f"TLS: clients check the servers against the CA in {info.nats_ca}")


async def _wait_for_nodes(client: Client, hosts: int, info: launcher.ClusterInfo):
    def dead_process() -> str | None:
        dead = [name for name, alive in launcher.running_processes(info).items() if not alive]
        return f"{', '.join(dead)} exited during start-up; see {info.state_dir}/logs" if dead else None

    return await client.wait_until_ready(hosts, timeout_s=UP_TIMEOUT_S, check=dead_process)


@cli.command()
def down() -> None:
    """Stop the local cluster and everything it started (data stays in the state directory)."""
    state = state_dir()
    info = launcher.read_cluster(state)
    if info is None or not info.processes:
        click.echo(f"no cluster running in {state}")
        return
    stopped = launcher.stop(info, progress=lambda m: click.echo(f"  {m}", err=True))
    click.echo(f"stopped {len(stopped)} process(es); data kept in {state}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def status(as_json: bool) -> None:
    """Show the cluster's nodes, their health and load (and a planned cluster's machines)."""
    state = state_dir()
    info = launcher.read_cluster(state)
    processes = launcher.running_processes(info) if info else {}
    machines = cluster.machine_health(info) if info and info.planned else None
    if machines is not None and not as_json:
        click.echo(render.machines_table(machines) + "\n")
    found = run(lambda c: c.status())
    if as_json:
        shown = {"state_dir": str(state), "processes": processes, **msgspec.to_builtins(found)}
        print_json(shown | ({"machines": msgspec.to_builtins(machines)} if machines is not None else {}))
    else:
        click.echo(render.status_table(found, state, processes))


@cli.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--tenant", default=None, help="deploy under this tenant instead of the manifest's")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def deploy(path: Path, tenant: str | None, as_json: bool) -> None:
    """Register the function in PATH (a directory holding function.toml, or the file itself).
    A python function's requirements are built into its dependency layer first (progress on
    stderr)."""
    reply = run(lambda c: c.deploy(path, tenant, progress=lambda line: click.echo(line, err=True)))
    if as_json:
        print_json(msgspec.to_builtins(reply))
        return
    spec = reply.function.spec
    verb = "deployed" if reply.updated else "unchanged"
    layer = f", layer {reply.function.layer_digest[:19]}" if reply.function.layer_digest else ""
    click.echo(
        f"{verb} {spec.tenant}/{spec.name} ({spec.runtime}, {reply.function.bundle_size} bytes, "
        f"{reply.function.bundle_digest[:19]}{layer}, revision {reply.revision})"
    )


@cli.command("rm")
@click.argument("name")
@click.option("--tenant", default=None, help=TENANT_HELP)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def remove(name: str, tenant: str | None, as_json: bool) -> None:
    """Remove function NAME: no new invocations; those running finish; its idle instances stop
    (an eBPF function's program is unloaded). Its code stays in the bundle store."""
    reply = run(lambda c: c.remove(acting_as(c, tenant), name))
    if as_json:
        print_json(msgspec.to_builtins(reply))
        return
    click.echo(f"removed {tenant}/{name} ({reply.function.bundle_digest[:19]})")


@cli.command()
@click.argument("name")
@click.option("--tenant", default=None, help=TENANT_HELP)
@click.option(
    "--tail", "lines", default=100, show_default=True, type=click.IntRange(1, 10_000), help="lines per node"
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def logs(name: str, tenant: str | None, lines: int, as_json: bool) -> None:
    """Print the last lines of function NAME's output (its stdout and stderr) from every host
    node that ran it, each line prefixed with its node when more than one did."""
    reply = run(lambda c: c.logs(acting_as(c, tenant), name, lines))
    if as_json:
        print_json(msgspec.to_builtins(reply))
        return
    if not reply.logs:
        click.echo(f"{tenant}/{name} has written nothing yet", err=True)
    for node_logs in reply.logs:
        prefix = f"{node_logs.node} | " if len(reply.logs) > 1 else ""
        for line in node_logs.lines:
            click.echo(prefix + line)


@cli.command()
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
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("-v", "--verbose", is_flag=True, help="also print node, cold/warm and latency to stderr")
@click.option("--trace", "show_trace", is_flag=True, help="then draw the invocation's trace (stderr)")
def invoke(
    name: str,
    tenant: str | None,
    data: str | None,
    data_file: IO[bytes] | None,
    timeout_ms: int,
    retry_after_ms: int,
    as_json: bool,
    verbose: bool,
    show_trace: bool,
) -> None:
    """Invoke function NAME; the payload is --data, --data-file, or stdin when it is not a terminal."""
    if data is not None and data_file is not None:
        raise click.UsageError("give --data or --data-file, not both")
    if data is not None:
        payload = data.encode()
    elif data_file is not None:
        payload = data_file.read()
    else:
        payload = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    outcome = run(
        lambda c: c.invoke(acting_as(c, tenant), name, payload, timeout_ms, retry_after_ms=retry_after_ms),
        trace_all=show_trace,
    )
    if as_json:
        print_json(render.invoke_json(outcome))
    elif outcome.ok:
        sys.stdout.buffer.write(outcome.reply.output)
        if outcome.reply.output and not outcome.reply.output.endswith(b"\n") and sys.stdout.isatty():
            sys.stdout.write("\n")
        sys.stdout.flush()
    # Output without a final newline, then stderr into the same pipe: start stderr on a line of
    # its own (stdout itself stays byte for byte what the function returned).
    unterminated = (
        outcome.ok and not as_json and not sys.stdout.isatty() and not outcome.reply.output.endswith(b"\n")
    )
    if verbose:
        click.echo(("\n" if unterminated else "") + render.invoke_summary(outcome), err=True)
    if show_trace:
        separator = "\n" if unterminated and not verbose else ""
        click.echo(separator + _wait_for_trace(outcome.invocation_id), err=True)
    if not outcome.ok:
        if not as_json:
            click.echo(f"error: {outcome.error.code}: {outcome.error.message}", err=True)
            if outcome.error.detail:
                click.echo(outcome.error.detail.rstrip(), err=True)
        sys.exit(1)


@cli.command()
@click.argument("obj", metavar="OBJ", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--program", default=None, help="the program's function name (needed if OBJ holds several)")
@click.option("--prog-type", default="xdp", show_default=True, type=click.Choice(sorted(PROG_TYPES)))
@click.option(
    "--mode",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "strict", "proven"]),
    help="strict: the kernel's unprivileged rules, with Spectre hardening; proven: packet arithmetic "
    "and bounded loops, no pointer leaks proven from the kernel's log; auto: strict if it passes",
)
@click.option("--tenant", default=None, help=TENANT_HELP)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def verify(
    obj: Path, program: str | None, prog_type: str, mode: str, tenant: str | None, as_json: bool
) -> None:
    """Check an eBPF object (clang -O2 -g -target bpf) against the platform's policy and the
    kernel verifier, without deploying it. Exit status 1 when it is rejected."""
    data = obj.read_bytes()
    reply = run(
        lambda c: c.verify(
            VerifyRequest(
                tenant=acting_as(c, tenant),
                function="",
                object=data,
                program=program,
                prog_type=prog_type,
                mode=mode,  # type: ignore[arg-type]  # click.Choice checked it
            )
        )
    )
    if as_json:
        body = msgspec.to_builtins(reply)
        body.pop("instructions", None)
        print_json(body)
    else:
        click.echo(render.verdict(reply, str(obj)))
    if not reply.accepted:
        sys.exit(1)


@cli.command()
@click.argument("digest")
@click.option("--reason", default="", help="why (kept with the revocation)")
def revoke(digest: str, reason: str) -> None:
    """Revoke an approved eBPF program by digest: DPU nodes unload it and refuse to load it again."""
    reply = run(lambda c: c.revoke(digest, reason))
    click.echo(f"revoked {reply.digest}")


TRACE_WAIT_S = 10.0  # services export spans every second (OTEL_BSP_SCHEDULE_DELAY)


def _traces_dir() -> Path:
    traces = state_dir() / "traces"
    if not traces.is_dir():
        raise click.ClickException(
            f"no traces in {state_dir()}: `hetfaas trace` reads the local cluster's OTLP-JSON files "
            "(with OTEL_EXPORTER_OTLP_ENDPOINT set, spans go to your collector instead)"
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


def _wait_for_trace(invocation_id: str) -> str:
    """The waterfall once every hop's spans have been exported (services flush every second)."""
    deadline = time.monotonic() + TRACE_WAIT_S
    while True:
        spans = traces.trace_of(_spans(), invocation_id)
        if HOPS <= {s.name for s in spans} or time.monotonic() > deadline:
            return traces.waterfall(spans) or f"no trace found for {invocation_id}"
        time.sleep(0.2)


@cli.command()
@click.argument("invocation_id")
@click.option("--json", "as_json", is_flag=True, help="print the spans as a JSON array")
def trace(invocation_id: str, as_json: bool) -> None:
    """Draw an invocation's trace as a waterfall: each hop and phase, where it ran, how long."""
    spans = traces.trace_of(_spans(), invocation_id)
    if not spans:
        raise click.ClickException(f"not_found: no trace for invocation {invocation_id} in {_traces_dir()}")
    if as_json:
        print_json([traces.span_json(s) for s in spans])
    else:
        click.echo(traces.waterfall(spans))


@cli.command()
@click.option("--function", "function", default=None, help="only this function's cold starts")
@click.option("--since", default=None, help="only the last DURATION (30s, 10m, 2h, 1d)")
@click.option("--json", "as_json", is_flag=True, help="print the rows as a JSON array")
def coldstarts(function: str | None, since: str | None, as_json: bool) -> None:
    """Summarise cold starts: how many, p50/p99 of each phase, its share of the time, by pool mode."""
    since_s = parse_duration(since) if since else trace_stream.MAX_AGE_S
    since_ns = time.time_ns() - round(since_s * 1e9) if since else 0
    summary = traces.cold_starts(_spans(since_s), function, since_ns)
    rows = traces.cold_start_rows(summary)
    if as_json:
        print_json(rows)
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


@cli.command("ls")
@click.option("--tenant", default=None, help="only this tenant's functions")
@click.option("--json", "as_json", is_flag=True, help="print one JSON array")
def list_functions(tenant: str | None, as_json: bool) -> None:
    """List deployed functions."""
    records = run(lambda c: c.functions(tenant))
    if as_json:
        print_json(msgspec.to_builtins(records))
    else:
        click.echo(render.functions_table(records))


cli.add_command(tenants.tenant)
cli.add_command(maps.maps)
cli.add_command(account.account)
cli.add_command(nodes.node)
cli.add_command(cluster.cluster)
cli.add_command(cluster.machine_group)


def main() -> None:
    logging.getLogger("asyncio").addFilter(quiet_tls_close)  # TLS links to NATS close noisily
    cli(prog_name="hetfaas")
