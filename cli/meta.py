"""`hetfaas version` (this client's, and the cluster's services') and `hetfaas completion SHELL`."""

import collections

import click

from cli.client import ClientError
from cli.context import run
from cli.output import CommandError, emit, output_option, structured
from schemas import version

COMPLETE_VARIABLE = "_HETFAAS_COMPLETE"  # click's shell completion asks through this variable


@click.command("version")
@click.option("--client", "client_only", is_flag=True, help="only this client's version (no cluster asked)")
@output_option
def version_command(client_only: bool, fmt: str) -> None:
    """This client's release and wire contract, and the releases the cluster's schedulers and
    nodes run (asked with `status`: the operator's credentials)."""
    shown: dict = {"client": {"version": version.release(), "wire": version.WIRE}}
    if not client_only:
        shown["cluster"] = _cluster_versions()
    if structured():
        emit(shown)
        return
    click.echo(f"Client: hetfaas {shown['client']['version']} (wire {version.WIRE})")
    cluster = shown.get("cluster")
    if cluster is None:
        return
    if "error" in cluster:
        click.echo(f"Cluster: unknown ({cluster['error']})")
        return
    for role in ("schedulers", "nodes"):
        releases = ", ".join(f"{release} x{count}" for release, count in cluster[role].items()) or "none"
        click.echo(f"Cluster {role}: {releases}")


def _cluster_versions() -> dict:
    """{"schedulers": {release: count}, "nodes": {...}}, or {"error": why} when the cluster cannot say."""

    async def ask(client):  # type: ignore[no-untyped-def]
        try:
            return await client.status()
        except ClientError as exc:
            return exc.error

    try:
        found = run(ask)
    except CommandError as exc:
        return {"error": f"{exc.code}: {exc.text}"}
    if not hasattr(found, "nodes"):
        return {"error": f"{found.code}: {found.message}"}
    schedulers = collections.Counter(s.version or "unknown" for s in found.schedulers)
    nodes = collections.Counter(n.version or "unknown" for n in found.nodes)
    return {"schedulers": dict(schedulers), "nodes": dict(nodes)}


@click.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL. Load it with, for bash:
    `source <(hetfaas completion bash)` (or save it under /etc/bash_completion.d/); zsh:
    `hetfaas completion zsh > "${fpath[1]}/_hetfaas"`; fish:
    `hetfaas completion fish > ~/.config/fish/completions/hetfaas.fish`."""
    from click.shell_completion import get_completion_class

    root = click.get_current_context().find_root().command
    completer = get_completion_class(shell)
    assert completer is not None  # the three choices are click's own
    click.echo(completer(root, {}, "hetfaas", COMPLETE_VARIABLE).source())
