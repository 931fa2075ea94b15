"""`hetfaas tenant ...`: the operator's tenant management. Credentials are issued from the
cluster's authority (the operator's keys, in the state directory) and revoked by pushing the
account's updated JWT to NATS; limits are stored in etcd through the scheduler."""

import asyncio
from pathlib import Path

import click
import msgspec

from cli import render
from cli.context import run, state_dir
from cli.output import CommandError, emit, output_option, structured
from deploy import authority, launcher
from fabric import credentials
from schemas.manifest import name_problems


def save_and_push(keys: authority.Authority, done: str, jwts: list[str]) -> None:
    """Keep the authority and send accounts' new JWTs to the servers (when the cluster runs; a
    cluster started later is started with them)."""
    directory = launcher.secrets_dir(state_dir())
    authority.save(keys, directory)
    info = launcher.read_cluster(state_dir())
    if info is not None and info.processes:
        try:
            asyncio.run(
                authority.push_accounts(info.nats_url, directory / authority.SYSTEM_CREDS, jwts, info.nats_ca)
            )
        except authority.PushError as exc:
            raise CommandError(
                "unavailable", f"{done} in {directory}, not yet on the servers: {exc}"
            ) from None


def authority_of_cluster() -> authority.Authority:
    directory = launcher.secrets_dir(state_dir())
    keys = authority.load(directory)
    if keys is None:
        raise CommandError(
            "unauthorized",
            f"no cluster authority in {directory}: tenants are managed by the operator "
            "of a cluster started with `hetfaas up`",
        )
    return keys


def _check_name(name: str) -> None:
    if problems := name_problems(tenant=name):
        raise CommandError("bad_request", "" + "; ".join(problems))


@click.group()
def tenant() -> None:
    """Tenants: their credentials and limits (the operator's commands)."""


@tenant.command("create")
@click.argument("name")
@click.option(
    "--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="creds file"
)
@output_option
def tenant_create(name: str, out: Path, fmt: str) -> None:
    """Create tenant NAME's credentials in OUT (a NATS .creds file, mode 0600): with them every
    command (`--creds OUT` or $HETFAAS_CREDS) acts for NAME, and only for NAME."""
    _check_name(name)
    keys = authority_of_cluster()
    credentials.write_secret(out, keys.issue("tenant", name))
    save_and_push(keys, f"{out} is written, tenant {name}'s account kept", [keys.tenant_account_jwt(name)])
    identity = credentials.read_creds(out)
    if structured():
        emit({"tenant": name, "creds": str(out.resolve()), "user": identity.user})
    else:
        click.echo(f"tenant {name}: credentials written to {out} (user {identity.user[:12]}...)")


@tenant.command("revoke")
@click.argument("name")
@output_option
def tenant_revoke(name: str, fmt: str) -> None:
    """Revoke every credential of tenant NAME: new connections are refused at once, open ones
    closed as soon as the servers hear of it. Other tenants are not affected."""
    _check_name(name)
    keys = authority_of_cluster()
    revoked = keys.revoke("tenant", name)
    if not revoked:
        raise CommandError("not_found", f"tenant {name!r} has no credentials that are not revoked")
    save_and_push(keys, "revoked", [keys.tenant_account_jwt(name)])
    if structured():
        emit({"tenant": name, "revoked": revoked})
    else:
        click.echo(f"tenant {name}: {len(revoked)} credential(s) revoked")


@tenant.command("ls")
@output_option
def tenant_list(fmt: str) -> None:
    """The tenants credentials were issued to, and which are revoked."""
    rows = [
        {
            "tenant": name,
            "credentials": len(issued),
            "active": sum(not i.revoked for i in issued),
            "created": min(i.issued_at for i in issued),
        }
        for name, issued in sorted(authority_of_cluster().tenants().items())
    ]
    if structured():
        emit(rows)
    else:
        click.echo(render.tenants_table(rows))


@tenant.command("set")
@click.argument("name")
@click.option(
    "--max-concurrency",
    required=True,
    type=click.IntRange(1, 1_000_000),
    help="the tenant's invocations running at once, cluster-wide; beyond it they queue, then throttle",
)
@click.option(
    "--weight",
    default=1,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="its share of the nodes' room against other tenants' weights, while invocations wait for room",
)
@output_option
def tenant_set(name: str, max_concurrency: int, weight: int, fmt: str) -> None:
    """Set tenant NAME's limits (stored in etcd; every scheduler replica follows them)."""
    reply = run(lambda c: c.set_tenant(name, max_concurrency, weight))
    if structured():
        emit(msgspec.to_builtins(reply.record))
    else:
        record = reply.record
        click.echo(
            f"tenant {record.tenant}: max_concurrency {record.max_concurrency}, weight {record.weight}"
        )
