"""`hetfaas machine run DIR/<machine>`: the machine's roles, each its own OS process, in the
foreground until SIGTERM (or SIGINT), as systemd runs it (deploy/systemd/hetfaas-machine@.service).

Every role's command line names the machine directory (its config is rendered into DIR/run at
each start), so `ps` shows which machine a process serves. A role that exits is started again
after a pause that doubles from 1 s to 30 s (back to 1 s after a minute of running), as systemd's
`Restart=on-failure` would; each role dies with the supervisor (PR_SET_PDEATHSIG), so nothing
outlives a `kill -9` of it. On SIGTERM the services stop first, then etcd, then nats-server; the
exit status is 0.

On etcd members the supervisor also turns etcd's auth on and makes every service identity's
user, once the members have a leader (each member tries; etcd makes it idempotent).
"""

import asyncio
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from deploy import etcd_auth, machine, services
from deploy.machine import EtcdUser, Files, MachineConfig, MachineRole, NatsAccounts
from fabric import credentials
from fabric.settings import write_settings
from schemas.permissions import etcd_grants

STOP_TIMEOUT_S = 20.0  # then SIGKILL (the unit's TimeoutStopSec is longer)
FIRST_PAUSE_S, LAST_PAUSE_S, STEADY_S = 1.0, 30.0, 60.0
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """In the child before exec: its own session (a terminal's ^C reaches the supervisor only,
    which stops the roles in order) and SIGTERM when the supervisor dies."""
    os.setsid()
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class RoleProcess:
    """One role: its command line, its log, and the process running it now."""

    def __init__(self, role: MachineRole, argv: list[str], log_path: Path, say: Callable[[str], None]):
        self.role = role
        self.argv = argv
        self.log_path = log_path
        self.say = say
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        finally:
            os.close(log)
        self.say(f"started {self.role} (pid {self.proc.pid})")

    async def keep_running(self, stopping: asyncio.Event, first_pause_s: float = FIRST_PAUSE_S) -> None:
        """Start again whenever it exits (after `first_pause_s`, doubling), until `stopping`."""
        pause = first_pause_s
        while not stopping.is_set():
            started = time.monotonic()
            await self.start()
            assert self.proc is not None
            status = await self.proc.wait()
            if stopping.is_set():
                return
            pause = first_pause_s if time.monotonic() - started > STEADY_S else pause
            self.say(
                f"{self.role} exited with status {status}; again in {pause:.0f} s (log: {self.log_path})"
            )
            try:
                await asyncio.wait_for(stopping.wait(), pause)
            except TimeoutError:
                pass
            pause = min(pause * 2, max(LAST_PAUSE_S, first_pause_s))

    async def stop(self, timeout_s: float) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            self.say(f"{self.role} did not stop within {timeout_s:.0f} s: killing it")
            self.proc.kill()
            await self.proc.wait()
        self.say(f"stopped {self.role}")


def prepare(root: Path, data: Path) -> tuple[MachineConfig, list[RoleProcess]]:
    """The machine's roles with their configs rendered into root/run, in start order."""
    config = machine.read(root)
    files = Files(root)
    run_dir = root / "run"
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    logs = data / "logs"
    logs.mkdir(exist_ok=True, mode=0o700)
    say = _sayer(config.name)
    roles: list[RoleProcess] = []
    if "nats" in config.roles:
        accounts = msgspec.json.decode(files.accounts.read_bytes(), type=NatsAccounts)
        (data / "nats-accounts").mkdir(exist_ok=True, mode=0o700)
        conf = run_dir / "nats.conf"
        credentials.write_secret(conf, machine.nats_config(config, files, data, accounts))
        argv = [services.nats_server_binary(), "-c", str(conf)]
        roles.append(RoleProcess("nats", argv, logs / "nats.log", say))
    if "etcd" in config.roles:
        roles.append(RoleProcess("etcd", machine.etcd_argv(config, files, data), logs / "etcd.log", say))
    for role in machine.SERVICE_ROLES:
        if role in config.roles:
            path = run_dir / f"{role}.toml"
            write_settings(machine.service_settings(config, role, files, data), path)
            roles.append(RoleProcess(role, machine.service_argv(role, path), logs / f"{role}.log", say))
    return config, roles


def _sayer(name: str) -> Callable[[str], None]:
    def say(message: str) -> None:
        print(f"{name}: {message}", flush=True)

    return say


def run(root: Path, data: Path | None = None, restart_after_s: float = FIRST_PAUSE_S) -> int:
    """Run the machine directory `root`'s roles until SIGTERM or SIGINT; the exit status."""
    root = root.resolve()
    config, roles = prepare(root, (data or root / "data").resolve())
    return asyncio.run(_supervise(root, config, roles, restart_after_s))


async def _supervise(
    root: Path, config: MachineConfig, roles: list[RoleProcess], restart_after_s: float
) -> int:
    say = _sayer(config.name)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    running = [
        asyncio.create_task(role.keep_running(stopping, restart_after_s), name=role.role) for role in roles
    ]
    if "etcd" in config.roles:
        running.append(asyncio.create_task(secure_etcd(config, Files(root), stopping, say)))
    say(f"running {', '.join(config.roles)} (directory {root})")
    await stopping.wait()
    say("stopping")
    for role in reversed(roles):  # services, then etcd, then nats-server
        await role.stop(STOP_TIMEOUT_S)
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    say("stopped")
    return 0


async def secure_etcd(
    config: MachineConfig, files: Files, stopping: asyncio.Event, say: Callable[[str], None]
) -> None:
    """etcd's auth on, with every service identity's user, as soon as the members can agree."""
    users = msgspec.json.decode(files.etcd_users.read_bytes(), type=list[EtcdUser])
    admin = etcd_auth.EtcdAdmin(
        f"{config.address}:{config.ports.etcd}",
        credentials.read_etcd_login(files.etcd_root),
        str(files.ca),
        client_cert=str(files.client_pem),
    )
    last_error = ""
    while not stopping.is_set():
        try:
            await asyncio.to_thread(_secure, admin, users)
            say(f"etcd: auth on, {len(users)} service users")
            return
        except etcd_auth.EtcdAuthError as exc:  # no quorum yet, or this member still starting
            if str(exc) != last_error:
                say(f"etcd: not secured yet ({exc}); trying again")
                last_error = str(exc)
        try:
            await asyncio.wait_for(stopping.wait(), 1.0)
        except TimeoutError:
            pass


def _secure(admin: etcd_auth.EtcdAdmin, users: list[EtcdUser]) -> None:
    admin.secure()
    for user in users:
        role = user.role
        assert role in ("scheduler", "host", "dpu"), role
        login = credentials.EtcdLogin(etcd_auth.user_name(role, user.name), user.password)  # type: ignore[arg-type]
        admin.ensure_user(login, etcd_grants(role, user.name))  # type: ignore[arg-type]
