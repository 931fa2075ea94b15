"""What every command shares: finding the cluster, the identity it acts as, running one client
operation with errors mapped to exit status 1, printing JSON."""

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click
import nats

from cli import render
from cli.client import Client, ClientError, ProgramRejected
from cli.output import CommandError
from deploy import launcher
from fabric.bundles import BundleError
from fabric.telemetry import setup_tracing, stop_tracing
from schemas.manifest import ManifestError

TENANT_HELP = "act for this tenant (default: the credentials' tenant, or 'default' for the operator)"


def acting_as(client: Client, tenant: str | None) -> str:
    """The tenant a command acts for: the one named, else the credentials' own."""
    return tenant or client.tenant or "default"


def state_dir() -> Path:
    """The cluster the CLI acts on: --context (or $HETFAAS_CONTEXT), a planned cluster's
    operator directory (`hetfaas cluster plan`), else the local cluster's state directory."""
    ctx = click.get_current_context(silent=True)
    given = ctx.find_root().params.get("context") if ctx else None
    if given := given or os.environ.get("HETFAAS_CONTEXT"):
        path = Path(given).resolve()
        if not (path / launcher.CLUSTER_FILE).is_file():
            raise CommandError(
                "bad_request",
                f"{path} is not a cluster context (no {launcher.CLUSTER_FILE}): "
                "`hetfaas cluster plan SPEC --out DIR` writes one in DIR/operator",
            )
        return path
    return launcher.default_state_dir()


def nats_url() -> str:
    if url := os.environ.get("HETFAAS_NATS_URL"):
        return url
    info = launcher.read_cluster(state_dir())
    if info is None or not (info.processes or info.planned):
        raise CommandError(
            "not_found", f"no cluster found in {state_dir()}: run `hetfaas up` or set HETFAAS_NATS_URL"
        )
    return info.nats_url


def creds() -> str:
    """The identity of every command: --creds, else $HETFAAS_CREDS, else the operator's
    credentials of the local cluster (`hetfaas up` keeps them in its state directory)."""
    return _chosen("creds", "HETFAAS_CREDS", lambda info: info.nats_creds)


def ca() -> str:
    """The CA a TLS cluster's NATS certificate is checked against: --ca, else $HETFAAS_CA, else
    the local cluster's (`nats_ca` in its cluster.json)."""
    return _chosen("ca", "HETFAAS_CA", lambda info: info.nats_ca)


def _chosen(option: str, variable: str, local: Callable[[launcher.ClusterInfo], str]) -> str:
    """A global option's value, else the environment's, else the local cluster's (none when
    $HETFAAS_NATS_URL points elsewhere)."""
    ctx = click.get_current_context(silent=True)
    given = ctx.find_root().params.get(option) if ctx else None
    if given := given or os.environ.get(variable):
        return str(given)
    info = launcher.read_cluster(state_dir())
    return local(info) if info and not os.environ.get("HETFAAS_NATS_URL") else ""


def run(coro_fn: Callable[..., Awaitable[Any]], *args: Any, trace_all: bool = False) -> Any:
    """Run one client operation with tracing into the state directory, mapping errors to exit 1.
    `trace_all`: this command's trace is kept whatever the sampler (`invoke --trace`)."""
    state = state_dir()
    provider = setup_tracing(
        "cli", str(state) if state.is_dir() else None, enabled=True, sample_all=trace_all
    )

    async def main() -> Any:
        client = await Client.connect(nats_url(), creds=creds(), ca=ca())
        try:
            return await coro_fn(client, *args)
        finally:
            await client.close()

    try:
        return asyncio.run(main())
    except ProgramRejected as exc:
        click.echo(render.verdict(exc.verdict, "the function's program"), err=True)
        raise CommandError(exc.error.code, exc.error.message, exc.error.detail) from None
    except ClientError as exc:
        raise CommandError(exc.error.code, exc.error.message, exc.error.detail) from None
    except (ManifestError, BundleError) as exc:
        raise CommandError("bad_request", f"{exc}") from None
    except (OSError, nats.errors.Error) as exc:
        raise CommandError("unavailable", f"cannot reach the cluster at {nats_url()} ({exc})") from None
    finally:
        if provider:
            stop_tracing()  # flushes the client's spans before the command returns


def print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))
