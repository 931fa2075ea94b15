"""A cluster of five machines from one SPEC (`hetfaas cluster plan`), each a network namespace
running `hetfaas machine run` on its own directory: 3 NATS servers and 3 etcd members spread over
them, 2 schedulers, 2 host nodes, a verifier and a DPU node. Under a steady load, one process at
a time is killed with SIGKILL (its supervisor starts it again 8 s later)."""

import asyncio
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy import build_ebpf
from tests.integration.conftest import EXAMPLES, make_function, wait_until
from tests.integration.lan import Lan, needs_namespaces
from tests.integration.topology import ECHO, Load, PlannedCluster, around

pytestmark = [pytest.mark.integration, pytest.mark.privileged]

TIMEOUT_MS = 8_000
RESTART_AFTER_S = 8.0  # a killed role stays down this long: long enough to deploy meanwhile


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlannedCluster]:
    needs_namespaces()
    lan = Lan()
    cluster = None
    try:
        cluster = PlannedCluster(lan, tmp_path_factory.mktemp("lab"), RESTART_AFTER_S)
        cluster.start()
        health = asyncio.run(cluster.until_healthy(90))
        assert [(r.machine, r.role, r.health) for r in health if not r.ok] == [], "the machines start"
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        lan.close()


def echo_function(root: Path, name: str) -> Path:
    return make_function(
        root, name, 'runtime = "python"\nhandler = "main:handle"\nconcurrency = 8\n', {"main.py": ECHO}
    )


async def test_every_machine_runs_its_roles_from_its_directory(lab: PlannedCluster) -> None:
    client = await lab.client("lab-setup")
    try:
        status = await client.wait_until_ready(3, schedulers=2, timeout_s=90)
    finally:
        await client.close()
    health = await lab.until_healthy(30)

    assert sorted(n.node_id for n in status.nodes) == ["m4", "m5", "m5-dpu"]
    assert sorted(s.scheduler_id for s in status.schedulers) == ["m1", "m2"]
    assert [(r.machine, r.role) for r in health if not r.ok] == []
    assert sorted(r.health for r in health if r.role == "etcd") == ["follower", "follower", "leader"]
    for machine, roles in (("m1", ["nats", "etcd", "scheduler"]), ("m5", ["host", "dpu"])):
        for role in roles:  # each role its own process, in that machine's namespace
            pid = lab.pid_of(machine, role)
            assert Lan.namespace_of(pid) == lab.lan.inode(machine), (machine, role)


async def test_faults_one_at_a_time_under_load(lab: PlannedCluster, tmp_path: Path) -> None:
    client = await lab.client("lab-load")
    try:
        await client.wait_until_ready(3, schedulers=2, timeout_s=90)
        assert all(r.ok for r in await lab.until_healthy(30))
        await client.deploy(echo_function(tmp_path, "echo"), tenant="load")
        clang = shutil.which("clang")
        if clang is not None:
            build_ebpf.build(EXAMPLES / "ebpf-counter", clang)  # setup.sh built it; cheap if so
        await client.deploy(EXAMPLES / "ebpf-counter", tenant="examples")
        on_dpu = await client.invoke("examples", "packet-counter", bytes(64), timeout_ms=TIMEOUT_MS)

        load = Load(client, "load", "echo", TIMEOUT_MS)
        running = asyncio.create_task(load.run(workers=12))
        assert await wait_until(lambda: len(load.calls) >= 100, 30), "the load runs"
        faults = []

        # The NATS server on m1: scheduler m1 and host m4 are connected to it (a machine's own
        # server first; m4 starts at the first). While it is down: a deploy and a cold call.
        killed = lab.kill("m1", "nats")
        fresh = await client.deploy(echo_function(tmp_path, "fresh"), tenant="load")
        cold = await client.invoke("load", "fresh", b"first", timeout_ms=TIMEOUT_MS)
        with pytest.raises(LookupError):
            lab.pid_of("m1", "nats")  # it was still down
        faults.append(await settle(lab, load, killed, "nats-server m1"))

        leader = lab.etcd_leader(await lab.health())
        faults.append(await settle(lab, load, lab.kill(leader, "etcd"), f"etcd leader {leader}"))
        faults.append(await settle(lab, load, lab.kill("m2", "scheduler"), "scheduler m2"))
        busy = load.calls[-1].outcome.node or "m4"
        faults.append(await settle(lab, load, lab.kill(busy, "host"), f"host node {busy}"))

        load.stopping.set()
        await running
    finally:
        await client.close()
    (lab.out / "faults.json").write_text(json.dumps([f.__dict__ for f in faults], indent=2))
    calls = load.calls
    runs = lab.runs_per_payload("load", "echo")
    ok = [c for c in calls if c.outcome.ok]

    assert on_dpu.ok and on_dpu.node == "m5-dpu", on_dpu.error
    assert fresh.updated and cold.ok and cold.reply.cold_start, cold.error
    assert [c.payload for c in calls if c.ended - c.started > TIMEOUT_MS / 1000 + 0.5] == []
    assert len(ok) >= 0.99 * len(calls), [f.__dict__ for f in faults]
    assert all(json.loads(c.outcome.reply.output)["echo"] == c.payload for c in ok)
    assert {p: n for p, n in runs.items() if n > 1} == {}, "no invocation ran twice"
    assert all(runs.get(c.payload) == 1 for c in ok), "every answered invocation ran (once)"
    assert len(faults) == 4 and all(f.calls > 0 for f in faults)


async def settle(lab: PlannedCluster, load: Load, killed_at: float, fault: str):
    """Let the load run past the fault's window, then until every role is back."""
    assert await wait_until(lambda: load.calls and load.calls[-1].started > killed_at + 3, 20), fault
    health = await lab.until_healthy(60)
    assert [(r.machine, r.role, r.health) for r in health if not r.ok] == [], f"back after {fault}"
    return around(load.calls, killed_at, fault)


def test_sigterm_stops_every_machine_cleanly(lab: PlannedCluster) -> None:
    """What systemd does on `systemctl stop` (KillMode=mixed: SIGTERM to the supervisor alone):
    each machine's supervisor stops its roles and exits 0, leaving no process behind."""
    roots = [str(lab.machine_dir(name)) for name in lab.supervisors]
    statuses = lab.stop()
    left = [pid for pid in os.listdir("/proc") if pid.isdigit() and _names_any(pid, roots)]

    assert statuses == {name: 0 for name in lab.supervisors}
    assert left == []


def _names_any(pid: str, roots: list[str]) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return any(root.encode() in cmdline for root in roots)
