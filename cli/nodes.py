"""`hetfaas node drain|uncordon NAME`: take a node out of placement for maintenance (kubectl's
drain and uncordon). Drained, nothing more is placed on it, its running invocations finish and
its warm instances are released; the cordon is kept in etcd, so every scheduler replica, and one
started later, honours it until `uncordon`."""

import click
import msgspec

from cli.context import print_json, run


@click.group()
def node() -> None:
    """Drain a node for maintenance, and bring it back."""


@node.command("drain")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def node_drain(name: str, as_json: bool) -> None:
    """No new placements on node NAME; its running invocations finish; its warm instances go."""
    reply = run(lambda c: c.drain(name, True))
    if as_json:
        print_json(msgspec.to_builtins(reply))
        return
    click.echo(
        f"node {reply.node_id} drained: nothing more is placed on it; released {reply.released} warm "
        f"instances, {reply.running} invocations still running" + (f" ({reply.note})" if reply.note else "")
    )


@node.command("uncordon")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def node_uncordon(name: str, as_json: bool) -> None:
    """Place invocations on node NAME again."""
    reply = run(lambda c: c.drain(name, False))
    if as_json:
        print_json(msgspec.to_builtins(reply))
        return
    click.echo(f"node {reply.node_id} uncordoned: placements may go to it again")
