"""`hetfaas node drain|uncordon NAME`: take a node out of placement for maintenance (kubectl's
drain and uncordon). Drained, nothing more is placed on it, its running invocations finish and
its warm instances are released; the cordon is kept in etcd, so every scheduler replica, and one
started later, honours it until `uncordon`."""

import click
import msgspec

from cli.context import run
from cli.output import emit, output_option, structured


@click.group()
def node() -> None:
    """Drain a node for maintenance, and bring it back."""


@node.command("drain")
@click.argument("name")
@output_option
def node_drain(name: str, fmt: str) -> None:
    """No new placements on node NAME; its running invocations finish; its warm instances go."""
    reply = run(lambda c: c.drain(name, True))
    if structured():
        emit(msgspec.to_builtins(reply))
        return
    click.echo(
        f"node {reply.node_id} drained: nothing more is placed on it; released {reply.released} warm "
        f"instances, {reply.running} invocations still running" + (f" ({reply.note})" if reply.note else "")
    )


@node.command("uncordon")
@click.argument("name")
@output_option
def node_uncordon(name: str, fmt: str) -> None:
    """Place invocations on node NAME again."""
    reply = run(lambda c: c.drain(name, False))
    if structured():
        emit(msgspec.to_builtins(reply))
        return
    click.echo(f"node {reply.node_id} uncordoned: placements may go to it again")
