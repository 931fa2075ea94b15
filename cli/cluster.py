"""`hetfaas cluster plan` and `hetfaas machine run|install`: a cluster of many machines from one
SPEC (deploy/plan.py), each machine's roles run by a supervisor (deploy/supervisor.py)."""

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click

from cli.output import CommandError, emit, output_option, structured
from deploy import launcher, machine, plan, probe, supervisor

UNIT = "hetfaas-machine@.service"
UNIT_TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "systemd" / UNIT
INSTALL_ROOT = Path("/var/lib/hetfaas")
UNIT_DIR = Path("/etc/systemd/system")


@click.group()
def cluster() -> None:
    """Plan a cluster of many machines."""


@cluster.command("plan")
@click.argument("spec", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="where to write")
@click.option(
    "--rotate-signing-key", is_flag=True, help="a new verifier key signs; nodes still trust the older"
)
@click.option(
    "--retire-signing-keys", is_flag=True, help="nodes stop trusting every verifier key but the newest"
)
@output_option
def cluster_plan(
    spec: Path, out: Path, rotate_signing_key: bool, retire_signing_keys: bool, fmt: str
) -> None:
    """Write OUT/<machine>/ for every machine of SPEC and OUT/operator/, the operator's context.

    Planning again into the same OUT keeps the cluster's CA, keys and identities."""
    try:
        cluster_spec = plan.read_spec(spec)
        written = plan.plan(
            cluster_spec,
            out.resolve(),
            rotate=rotate_signing_key,
            retire=retire_signing_keys,
            progress=lambda m: click.echo(f"  {m}", err=True),
        )
    except (plan.PlanError, machine.MachineError) as exc:
        raise CommandError("bad_request", f"{exc}") from None
    if structured():
        emit(
            {"out": str(out), "written": [str(path) for path in written], "context": str(out / plan.OPERATOR)}
        )
        return
    click.echo(f"wrote {len(written) - 1} machine directories and the operator's context in {out}")
    click.echo(f"  on each machine: hetfaas machine install {out}/<machine>  (or: hetfaas machine run ...)")
    click.echo(f"  then here:       export HETFAAS_CONTEXT={out / plan.OPERATOR}; hetfaas status")


@click.group("machine")
def machine_group() -> None:
    """Run or install one machine of a planned cluster."""


@machine_group.command("run")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="the roles' data and logs (default: DIRECTORY/data)")  # fmt: skip
@click.option("--restart-after", type=click.FloatRange(0.1, 600), default=supervisor.FIRST_PAUSE_S,
              show_default=True, help="seconds before a role that exited starts again")  # fmt: skip
def machine_run(directory: Path, data_dir: Path | None, restart_after: float) -> None:
    """Run this machine's roles in the foreground until SIGTERM or ^C."""
    try:
        status = supervisor.run(directory, data_dir, restart_after)
    except machine.MachineError as exc:
        raise CommandError("unavailable", str(exc)) from None
    sys.exit(status)


@machine_group.command("install")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--no-start", is_flag=True, help="install and enable, but do not start it now")
@output_option
def machine_install(directory: Path, no_start: bool, fmt: str) -> None:
    """Put DIRECTORY in /var/lib/hetfaas/<machine> and enable hetfaas-machine@<machine> (root)."""
    try:
        config = machine.read(directory)
    except machine.MachineError as exc:
        raise CommandError("unavailable", str(exc)) from None
    if os.geteuid() != 0:
        raise CommandError("unauthorized", "installing a machine needs root")
    target = install_files(directory, config.name, INSTALL_ROOT, UNIT_DIR)
    unit = f"hetfaas-machine@{config.name}"
    systemd = shutil.which("systemctl") is not None and Path("/run/systemd/system").is_dir()
    if systemd:
        subprocess.run(["systemctl", "daemon-reload"], check=True)
        subprocess.run(["systemctl", "enable", *([] if no_start else ["--now"]), unit], check=True)
    if structured():
        emit(
            {"installed": str(target), "unit": unit if systemd else None, "started": systemd and not no_start}
        )
        return
    click.echo(f"installed {target} and {UNIT_DIR / UNIT}")
    if not systemd:
        click.echo(f"systemd is not running here: start the machine with `hetfaas machine run {target}`")
        return
    click.echo(f"{unit} enabled" + ("" if no_start else " and started: `journalctl -u " + unit + " -f`"))


def install_files(directory: Path, name: str, root: Path, unit_dir: Path) -> Path:
    """Copy the machine directory (its run and data directories excepted) and write the unit,
    its python being this one. Safe to run again: the copy is refreshed, data stays."""
    target = root / name
    root.mkdir(parents=True, exist_ok=True, mode=0o755)
    shutil.copytree(directory, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("run", "data"))
    target.chmod(0o700)
    unit_dir.mkdir(parents=True, exist_ok=True)
    text = UNIT_TEMPLATE.read_text().replace("/opt/hetfaas/.venv/bin/python", sys.executable)
    (unit_dir / UNIT).write_text(text.replace("/var/lib/hetfaas/", f"{root}/"))
    return target


def machine_health(info: launcher.ClusterInfo) -> list[probe.RoleHealth]:
    """Every planned machine's roles and their health (`hetfaas status` with a context)."""
    context = plan.read_context(Path(info.state_dir))
    if context is None:
        raise CommandError("bad_request", f"{info.state_dir} has no machines.json (plan it again)")
    return asyncio.run(probe.machines(info, context))
