"""A planned cluster on network-namespace machines (tests/integration/lan.py): `hetfaas cluster
plan` writes the machine directories, one `hetfaas machine run` per machine runs its roles, and
faults are real (`kill -9` of one role's process). Shared by the topology test and
bench/failover.py, which times the same faults."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from cli.client import Client, InvokeOutcome
from deploy import launcher, plan, probe
from tests.integration.conftest import wait_until
from tests.integration.lan import Lan

# 5 machines: 3 NATS servers and 3 etcd members spread over them, 2 schedulers, 2 host nodes, a
# verifier and a DPU node. Failure detection as fast as the other failure tests'.
ROLES = {
    "m1": ["nats", "etcd", "scheduler"],
    "m2": ["nats", "etcd", "scheduler"],
    "m3": ["nats", "etcd", "verifier"],
    "m4": ["host"],
    "m5": ["host", "dpu"],
}
FAST = {
    "scheduler": {
        "lease_ttl_s": 2,
        "node_stale_after_s": 1.0,
        "admission": {"max_queue_wait_ms": 10_000},
    },
    "host": {"lease_ttl_s": 2, "heartbeat_interval_s": 0.2, "keep_alive_s": 60.0, "capacity": 16},
    "dpu": {"lease_ttl_s": 2, "heartbeat_interval_s": 0.2},
}
# Prints what it runs (the node's function log: how the tests count runs) and echoes it.
ECHO = """
import time

def handle(payload):
    print("ran", payload.decode(), flush=True)
    time.sleep(0.02)
    return {"echo": payload.decode()}
"""


def spec_text(addresses: dict[str, str]) -> str:
    machines = [
        {
            "name": name,
            "address": addresses[name],
            "roles": roles,
            "settings": {role: FAST[role] for role in roles if role in FAST},
        }
        for name, roles in ROLES.items()
    ]
    return tomli_w.dumps({"cluster": {"name": "lab"}, "machine": machines})


class PlannedCluster:
    """The machines of ROLES, each a namespace running `hetfaas machine run` on its directory."""

    def __init__(self, lan: Lan, out: Path, restart_after_s: float):
        self.lan = lan
        self.out = out
        self.restart_after_s = restart_after_s
        self.addresses = {name: lan.add(name) for name in ROLES}
        self.supervisors: dict[str, subprocess.Popen] = {}
        spec = out / "spec.toml"
        out.mkdir(parents=True, exist_ok=True)
        spec.write_text(spec_text(self.addresses))
        plan.plan(plan.read_spec(spec), out / "plan")
        info = launcher.read_cluster(out / "plan" / plan.OPERATOR)
        assert info is not None
        self.info = info

    def start(self) -> None:
        for name in ROLES:
            argv = [sys.executable, "-m", "cli", "machine", "run", str(self.machine_dir(name))]
            argv += ["--restart-after", str(self.restart_after_s)]
            with open(self.out / f"{name}.supervisor.log", "ab") as log:
                self.supervisors[name] = subprocess.Popen(
                    [*self.lan.enter(name), *argv],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )

    def machine_dir(self, name: str) -> Path:
        return self.out / "plan" / name

    async def client(self, name: str) -> Client:
        return await Client.connect(
            self.info.nats_url, name, creds=self.info.nats_creds, ca=self.info.nats_ca
        )

    def pid_of(self, machine: str, role: str) -> int:
        """The process running `role` on `machine` now (its command line names the directory)."""
        root = str(self.machine_dir(machine))
        marker = {
            "nats": f"{root}/run/nats.conf",
            "etcd": f"{root}/data/etcd",
        }.get(role, f"{root}/run/{role}.toml")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker.encode() in argv and b"machine" not in argv:
                return int(entry)
        raise LookupError(f"no {role} process on {machine}")

    def kill(self, machine: str, role: str) -> float:
        """`kill -9` the role's process; when it was sent (monotonic)."""
        pid = self.pid_of(machine, role)
        os.kill(pid, signal.SIGKILL)
        return time.monotonic()

    async def health(self) -> list[probe.RoleHealth]:
        context = plan.read_context(Path(self.info.state_dir))
        assert context is not None
        return await probe.machines(self.info, context)

    async def until_healthy(self, timeout_s: float) -> list[probe.RoleHealth]:
        """Every role of every machine ready (a restarted role rejoined)."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = await self.health()
            if all(r.ok for r in found) or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.5)  # a probe round is itself up to 1.5 s per dead role

    def etcd_leader(self, health: list[probe.RoleHealth]) -> str:
        [leader] = [r.machine for r in health if r.role == "etcd" and r.health == "leader"]
        return leader

    def stop(self, timeout_s: float = 60.0) -> dict[str, int | None]:
        """SIGTERM every supervisor (systemd's stop); their exit statuses (None: had to be killed)."""
        for proc in self.supervisors.values():
            proc.send_signal(signal.SIGTERM)
        statuses: dict[str, int | None] = {}
        for name, proc in self.supervisors.items():
            try:
                statuses[name] = proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                statuses[name] = None
        return statuses

    def runs_per_payload(self, tenant: str, function: str) -> dict[str, int]:
        """How many times each payload ran, from every host node's function log."""
        runs: dict[str, int] = {}
        for path in (self.out / "plan").glob(f"*/data/host/logs/{tenant}/{function}.log*"):
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("ran "):
                    runs[line[4:]] = runs.get(line[4:], 0) + 1
        return runs


@dataclass
class Call:
    payload: str
    started: float
    ended: float
    outcome: InvokeOutcome


@dataclass
class Load:
    """Callers invoking one function in a loop, each call with its own payload, until stopped."""

    client: Client
    tenant: str
    function: str
    timeout_ms: int
    calls: list[Call] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, workers: int) -> None:
        async def worker(w: int) -> None:
            i = 0
            while not self.stopping.is_set():
                payload = f"{w}-{i}"
                started = time.monotonic()
                outcome = await self.client.invoke(
                    self.tenant, self.function, payload.encode(), timeout_ms=self.timeout_ms
                )
                self.calls.append(Call(payload, started, time.monotonic(), outcome))
                i += 1

        await asyncio.gather(*(worker(w) for w in range(workers)))


@dataclass
class FaultResult:
    fault: str
    worst_s: float  # the longest an invocation in flight at the kill, or started 2 s after, took
    calls: int  # invocations in that window
    errors: list[str]  # their error codes
    killed_at: float = 0.0  # monotonic (0: no fault)


def around(calls: list[Call], killed_at: float, fault: str, window_s: float = 2.0) -> FaultResult:
    """The invocations in flight at the kill or started within `window_s` after it (pure)."""
    hit = [c for c in calls if c.ended >= killed_at and c.started <= killed_at + window_s]
    return FaultResult(
        fault=fault,
        worst_s=max((c.ended - c.started for c in hit), default=0.0),
        calls=len(hit),
        errors=[c.outcome.error.code for c in hit if not c.outcome.ok and c.outcome.error],
        killed_at=killed_at,
    )


async def kill_one_at_a_time(
    lab: PlannedCluster, load: Load, while_nats_is_down: Callable[[], Awaitable[None]] | None = None
) -> list[FaultResult]:
    """The faults of the issue, in turn, each settled before the next: the NATS server on m1
    (scheduler m1 and host m4 are connected to it: a machine's own server first, and m4 starts
    at the first), the etcd leader, scheduler m2, and the host node that answered last."""
    killed = lab.kill("m1", "nats")
    if while_nats_is_down is not None:
        await while_nats_is_down()
    faults = [await settle(lab, load, killed, "nats-server m1 (host m4's, scheduler m1's)")]
    leader = lab.etcd_leader(await lab.health())
    faults.append(await settle(lab, load, lab.kill(leader, "etcd"), f"etcd leader ({leader})"))
    faults.append(await settle(lab, load, lab.kill("m2", "scheduler"), "scheduler m2"))
    busy = load.calls[-1].outcome.node or "m4"
    faults.append(await settle(lab, load, lab.kill(busy, "host"), f"host node {busy}"))
    return faults


async def settle(lab: PlannedCluster, load: Load, killed_at: float, fault: str) -> FaultResult:
    """Let the load run past the fault's window, then until every role is back."""
    assert await wait_until(lambda: bool(load.calls) and load.calls[-1].started > killed_at + 3, 20), fault
    health = await lab.until_healthy(60)
    assert [(r.machine, r.role, r.health) for r in health if not r.ok] == [], f"back after {fault}"
    return around(load.calls, killed_at, fault)
