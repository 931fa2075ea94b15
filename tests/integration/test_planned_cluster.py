"""A cluster of five machines from one SPEC (`hetfaas cluster plan`), each a network namespace
running `hetfaas machine run` on its own directory: 3 NATS servers and 3 etcd members spread over
them, 2 schedulers, 2 host nodes, a verifier and a DPU node. Under a steady load, one process at
a time is killed with SIGKILL (its supervisor starts it again 20 s later)."""

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy import build_ebpf
from tests.integration.conftest import EXAMPLES, make_function, wait_until
from tests.integration.lan import Lan, needs_namespaces
from tests.integration.topology import ECHO, Load, PlannedCluster, kill_one_at_a_time

pytestmark = [pytest.mark.integration, pytest.mark.privileged]

TIMEOUT_MS = 8_000
RESTART_AFTER_S = 20.0  # a killed role stays down this long: a deploy meanwhile takes up to 11 s


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


def hetfaas(lab: PlannedCluster, *args: str) -> subprocess.CompletedProcess:
    """The CLI as an operator runs it: pointed at the cluster by its context directory."""
    env = os.environ | {"HETFAAS_CONTEXT": lab.info.state_dir}
    argv = [sys.executable, "-m", "cli", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)


async def test_the_operator_sees_every_machine_and_traces_across_them(
    lab: PlannedCluster, tmp_path: Path
) -> None:
    client = await lab.client("lab-operator")
    try:
        await client.wait_until_ready(3, schedulers=2, timeout_s=90)
        await client.deploy(echo_function(tmp_path, "traced"), tenant="ops")
    finally:
        await client.close()
    status = hetfaas(lab, "status")
    invoked = await asyncio.to_thread(
        hetfaas, lab, "invoke", "traced", "--tenant", "ops", "--data", "x", "--trace"
    )
    cold = hetfaas(lab, "coldstarts", "--json")

    assert status.returncode == 0, status.stderr
    assert "5 machines, 12 roles, all ready" in status.stdout, status.stdout
    assert invoked.returncode == 0 and '"echo": "x"' in invoked.stdout, invoked.stderr
    for hop in ("client.invoke", "scheduler.invoke", "node.invoke"):  # the CLI's, a scheduler's, a node's
        assert hop in invoked.stderr, invoked.stderr
    assert cold.returncode == 0 and json.loads(cold.stdout), cold.stderr


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
        while_down: list = []

        async def deploy_and_call_cold() -> None:  # while the NATS server of m1 is down
            while_down.append(await client.deploy(echo_function(tmp_path, "fresh"), tenant="load"))
            while_down.append(await client.invoke("load", "fresh", b"first", timeout_ms=TIMEOUT_MS))
            with pytest.raises(LookupError):
                lab.pid_of("m1", "nats")  # it was still down

        faults = await kill_one_at_a_time(lab, load, deploy_and_call_cold)

        load.stopping.set()
        await running
    finally:
        await client.close()
    (lab.out / "faults.json").write_text(json.dumps([f.__dict__ for f in faults], indent=2))
    calls = load.calls
    runs = lab.runs_per_payload("load", "echo")
    ok = [c for c in calls if c.outcome.ok]

    assert on_dpu.ok and on_dpu.node == "m5-dpu", on_dpu.error
    fresh, cold = while_down
    assert fresh.updated and cold.ok and cold.reply.cold_start, cold.error
    assert [c.payload for c in calls if c.ended - c.started > TIMEOUT_MS / 1000 + 0.5] == []
    assert len(ok) >= 0.99 * len(calls), [f.__dict__ for f in faults]
    assert all(json.loads(c.outcome.reply.output)["echo"] == c.payload for c in ok)
    assert {p: n for p, n in runs.items() if n > 1} == {}, "no invocation ran twice"
    assert all(runs.get(c.payload) == 1 for c in ok), "every answered invocation ran (once)"
    assert len(faults) == 4 and all(f.calls > 0 for f in faults)


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
