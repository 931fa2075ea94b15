"""The health of every role of a planned cluster's machines, as `hetfaas status` shows it: each
service's `/readyz`, each etcd member's raft status (leader or follower), and which nats-servers
answer the system account's ping. Everything is asked at once, each with a short timeout, so a
dead machine costs the command one timeout, not one per role."""

import asyncio
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import msgspec
import nats
import nats.errors
from nats.aio.msg import Msg

from deploy import authority, launcher
from deploy.plan import PlanContext
from fabric import bus

TIMEOUT_S = 1.5
SERVER_PING = "$SYS.REQ.SERVER.PING"  # every nats-server answers with its statsz


class RoleHealth(msgspec.Struct, frozen=True, kw_only=True):
    machine: str
    address: str
    role: str
    health: str  # "ready", "leader", "follower", "up"; else what is wrong
    ok: bool


def service_health(address: str, port: int) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(f"http://{address}:{port}/readyz", timeout=TIMEOUT_S) as resp:
            return True, resp.read().decode(errors="replace").strip() or "ready"
    except urllib.error.HTTPError as exc:  # 503: up, not ready, and why
        return False, exc.read().decode(errors="replace").strip() or f"HTTP {exc.code}"
    except OSError as exc:
        return False, f"unreachable ({getattr(exc, 'reason', exc)})"


def etcd_health(endpoint: str, ca: str, client_cert: str) -> tuple[bool, str]:
    """`leader` or `follower` from the member's own raft status; else why not."""
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(client_cert)
    request = urllib.request.Request(f"{endpoint}/v3/maintenance/status", data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=context) as resp:
            status = json.loads(resp.read())
    except (OSError, ValueError) as exc:
        return False, f"unreachable ({getattr(exc, 'reason', exc)})"
    if status.get("errors"):
        return False, "; ".join(status["errors"])
    own = status.get("header", {}).get("member_id")
    return True, "leader" if own is not None and status.get("leader") == own else "follower"


async def nats_servers(info: launcher.ClusterInfo, expected: int) -> set[str]:
    """The names of the nats-servers that answer the system account's ping."""
    system_creds = launcher.secrets_dir(Path(info.state_dir)) / authority.SYSTEM_CREDS
    options = {"tls": bus.tls_context(info.nats_ca)} if info.nats_ca else {}
    try:
        nc = await nats.connect(
            bus.servers(info.nats_url),
            user_credentials=str(system_creds),
            connect_timeout=TIMEOUT_S,
            allow_reconnect=False,
            error_cb=_quiet,  # a server that is down is what this probe reports, not a traceback
            **options,
        )
    except (OSError, nats.errors.Error):
        return set()
    names: set[str] = set()
    everyone = asyncio.Event()
    inbox = nc.new_inbox()

    async def answered(msg: Msg) -> None:
        names.add(json.loads(msg.data).get("server", {}).get("name", ""))
        if len(names) >= expected:
            everyone.set()

    try:
        await nc.subscribe(inbox, cb=answered)
        await nc.publish(SERVER_PING, b"", reply=inbox)
        try:
            await asyncio.wait_for(everyone.wait(), TIMEOUT_S)
        except TimeoutError:
            pass  # the servers that did not answer are down or cut off
    finally:
        await nc.close()
    return names


async def _quiet(exc: Exception) -> None:
    pass


async def machines(info: launcher.ClusterInfo, context: PlanContext) -> list[RoleHealth]:
    """Every role of every machine, in the SPEC's order."""
    ports = context.ports
    nats_machines = [m.name for m in context.machines if "nats" in m.roles]
    checks: dict[tuple[str, str], asyncio.Future] = {}
    for machine in context.machines:
        for role in machine.roles:
            if role == "etcd":
                endpoint = f"https://{machine.address}:{ports.etcd}"
                call = asyncio.to_thread(etcd_health, endpoint, info.etcd_ca, info.etcd_client_cert)
            elif role != "nats":
                call = asyncio.to_thread(service_health, machine.address, getattr(ports, role))
            else:
                continue
            checks[(machine.name, role)] = asyncio.ensure_future(call)
    answering = await nats_servers(info, len(nats_machines))
    found = []
    for machine in context.machines:
        for role in machine.roles:
            if role == "nats":
                ok = machine.name in answering
                health = "up" if ok else "not answering"
            else:
                ok, health = await checks[(machine.name, role)]
            found.append(
                RoleHealth(machine=machine.name, address=machine.address, role=role, health=health, ok=ok)
            )
    return found
