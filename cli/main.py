"""`hetfaas`: the command line. Thin: argument parsing and printing around `cli.client`."""

import logging
import os
from pathlib import Path

import click
import msgspec

from cli import account, cluster, functions, invoking, maps, meta, nodes, observe, render, tenants
from cli.client import Client
from cli.context import TENANT_HELP, acting_as, run, state_dir
from cli.output import CommandError, emit, exit_for, output_option, structured
from deploy import launcher
from deploy.services import ServiceError
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
@output_option
def up(hosts: int, schedulers: int, verifiers: int, dpus: int, use_tls: bool, fmt: str) -> None:
    """Start a local cluster in the background; returns when every node has registered.
    Secured: every connection to NATS and etcd authenticates, each identity with only its
    role's permissions; the operator's credentials are kept in the state directory."""
    state = state_dir()
    info = launcher.read_cluster(state)
    if info and info.processes and all(launcher.running_processes(info).values()):
        running_hosts = sum(name.startswith("host-") for name in info.processes)
        if structured():
            emit({"state_dir": str(state), "already_running": True, "nats_url": info.nats_url})
            return
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
        raise CommandError("unavailable", str(exc)) from None
    nodes = hosts + (dpus if os.geteuid() == 0 else 0)
    click.echo(f"  waiting for {nodes} node(s) to register", err=True)
    status = run(_wait_for_nodes, nodes, info)
    if structured():
        shown = {"state_dir": str(state), "nats_url": info.nats_url, "etcd": info.etcd_endpoint}
        emit(shown | {"nats_ca": info.nats_ca or None, **msgspec.to_builtins(status)})
        return
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
@output_option
def down(fmt: str) -> None:
    """Stop the local cluster and everything it started (data stays in the state directory)."""
    state = state_dir()
    info = launcher.read_cluster(state)
    running = info is not None and bool(info.processes)
    stopped = []
    if info is not None and running:
        # stop() forgets the processes it stopped, so whether any ran is read before
        stopped = launcher.stop(info, progress=lambda m: click.echo(f"  {m}", err=True))
    if structured():
        emit({"state_dir": str(state), "stopped": list(stopped)})
    elif not running:
        click.echo(f"no cluster running in {state}")
    else:
        click.echo(f"stopped {len(stopped)} process(es); data kept in {state}")


@cli.command()
@output_option
def status(fmt: str) -> None:
    """Show the cluster's nodes, their health and load (and a planned cluster's machines)."""
    state = state_dir()
    info = launcher.read_cluster(state)
    processes = launcher.running_processes(info) if info else {}
    machines = cluster.machine_health(info) if info and info.planned else None
    if machines is not None and not structured():
        click.echo(render.machines_table(machines) + "\n")
    found = run(lambda c: c.status())
    if structured():
        shown = {"state_dir": str(state), "processes": processes, **msgspec.to_builtins(found)}
        emit(shown | ({"machines": msgspec.to_builtins(machines)} if machines is not None else {}))
    else:
        click.echo(render.status_table(found, state, processes))


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
@output_option
def verify(obj: Path, program: str | None, prog_type: str, mode: str, tenant: str | None, fmt: str) -> None:
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
    if structured():
        body = msgspec.to_builtins(reply)
        body.pop("instructions", None)
        emit(body)
    else:
        click.echo(render.verdict(reply, str(obj)))
    if not reply.accepted:
        exit_for("rejected")


@cli.command()
@click.argument("digest")
@click.option("--reason", default="", help="why (kept with the revocation)")
@output_option
def revoke(digest: str, reason: str, fmt: str) -> None:
    """Revoke an approved eBPF program by digest: DPU nodes unload it and refuse to load it again."""
    reply = run(lambda c: c.revoke(digest, reason))
    if structured():
        emit(msgspec.to_builtins(reply))
    else:
        click.echo(f"revoked {reply.digest}")


for command in (
    functions.deploy,
    functions.remove,
    functions.list_functions,
    functions.get,
    functions.describe,
    functions.logs,
    invoking.invoke,
    invoking.result,
    invoking.await_result,
    observe.trace,
    observe.coldstarts,
    meta.version_command,
    meta.completion,
):
    cli.add_command(command)
cli.add_command(tenants.tenant)
cli.add_command(maps.maps)
cli.add_command(account.account)
cli.add_command(nodes.node)
cli.add_command(cluster.cluster)
cli.add_command(cluster.machine_group)


def main() -> None:
    logging.getLogger("asyncio").addFilter(quiet_tls_close)  # TLS links to NATS close noisily
    cli(prog_name="hetfaas")
