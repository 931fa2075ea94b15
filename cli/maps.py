"""`hetfaas maps ...`: a tenant's own ebpf maps, read or written on every node that has the
function's program loaded (the node applies a write to its copy: ebpf_runtime/map_writes.py)."""

import sys

import click

from cli import render
from cli.context import TENANT_HELP, acting_as, run
from cli.output import emit, output_option, structured
from schemas.ebpf import MapWrite


class _MapsGroup(click.Group):
    """`hetfaas maps NAME` shows (as before); `hetfaas maps set|delete NAME ...` writes."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["show", *args]
        return super().resolve_command(ctx, args)


@click.group(cls=_MapsGroup)
def maps() -> None:
    """Show or write the maps of an ebpf function (the tenant's own), on every node running it:
    `hetfaas maps NAME`, `hetfaas maps set NAME --map M --key K --value V`,
    `hetfaas maps delete NAME --map M --key K`. Keys and values: a number (little-endian, the
    field's size), 0x and hex bytes, or a prefix such as 10.1.0.0/16 for an LPM trie's key."""


@maps.command("show")
@click.argument("name")
@click.option("--tenant", default=None, help=TENANT_HELP)
@output_option
def maps_show(name: str, tenant: str | None, fmt: str) -> None:
    """Show the maps of an ebpf function, as each node running it holds them."""
    reply = run(lambda c: c.maps(acting_as(c, tenant), name))
    if structured():
        emit([render.map_json(dump) for dump in reply.maps])
    else:
        click.echo(render.maps_table(reply.maps) if reply.maps else f"{name} is not loaded on any node yet")


@maps.command("set")
@click.argument("name")
@click.option("--map", "map_name", required=True, help="the map (as the C names it; .data and .bss too)")
@click.option("--key", default="", help="the key (none for a queue or stack, whose value is pushed)")
@click.option("--value", required=True, help="the value")
@click.option("--tenant", default=None, help=TENANT_HELP)
@output_option
def maps_set(name: str, map_name: str, key: str, value: str, tenant: str | None, fmt: str) -> None:
    """Set one entry of a map of an ebpf function, on every node that has it loaded."""
    _write_map(name, MapWrite(map=map_name, key=key, value=value), tenant)


@maps.command("delete")
@click.argument("name")
@click.option("--map", "map_name", required=True, help="the map (as the C names it)")
@click.option("--key", required=True, help="the key")
@click.option("--tenant", default=None, help=TENANT_HELP)
@output_option
def maps_delete(name: str, map_name: str, key: str, tenant: str | None, fmt: str) -> None:
    """Delete one entry of a map of an ebpf function, on every node that has it loaded."""
    _write_map(name, MapWrite(map=map_name, key=key), tenant)


def _write_map(name: str, write: MapWrite, tenant: str | None) -> None:
    reply = run(lambda c: c.maps(acting_as(c, tenant), name, write))
    if structured():
        emit(
            {
                "applied": reply.applied,
                "refused": reply.refused,
                "maps": [render.map_json(d) for d in reply.maps],
            }
        )
    elif not reply.applied and not reply.refused:
        click.echo(
            f"{name} is not loaded on any node: nothing was written (a node loads it at its first call)"
        )
    else:
        verb = "deleted from" if write.value is None else "written to"
        click.echo(f"{write.map}: {verb} {len(reply.applied)} node(s): {', '.join(reply.applied) or 'none'}")
        for why in reply.refused:
            click.echo(f"  refused on {why}", err=True)
    if reply.refused or not reply.applied:
        sys.exit(1)
