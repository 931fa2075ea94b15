"""The `hetfaas` command as users run it: exit codes, --json shapes, stdin, up/down."""

import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy import launcher
from deploy.services import free_port
from tests.integration.conftest import EXAMPLES, cgroup_dirs_named, make_function

pytestmark = pytest.mark.integration

HETFAAS = [sys.executable, "-m", "cli"]


def hetfaas(
    state_dir: str | Path,
    *args: str,
    stdin: bytes | None = None,
    timeout_s: float = 60,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), "HETFAAS_STATE_DIR": str(state_dir)}
    env.pop("HETFAAS_NATS_URL", None)
    # Without a payload, give the command an empty stdin, never the test runner's own.
    stdin_arg = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run([*HETFAAS, *args], capture_output=True, env=env, timeout=timeout_s, **stdin_arg)


def test_deploy_invoke_ls_with_json(cluster: launcher.ClusterInfo, tenant: str) -> None:
    deployed = hetfaas(
        cluster.state_dir, "deploy", str(EXAMPLES / "hello-python"), "--tenant", tenant, "--json"
    )
    cold = hetfaas(cluster.state_dir, "invoke", "hello", "--tenant", tenant, "--data", "Ada", "--json")
    warm = hetfaas(cluster.state_dir, "invoke", "hello", "--tenant", tenant, "--json", stdin=b"Bob")
    listed = hetfaas(cluster.state_dir, "ls", "--tenant", tenant, "--json")

    assert deployed.returncode == 0, deployed.stderr
    assert json.loads(deployed.stdout)["function"]["spec"]["name"] == "hello"
    first, second = json.loads(cold.stdout), json.loads(warm.stdout)
    assert first["ok"] and first["cold_start"] is True and first["error"] is None
    assert json.loads(first["output"])["greeting"] == "hello, Ada!"
    assert second["cold_start"] is False and json.loads(second["output"])["greeting"] == "hello, Bob!"
    assert set(first) >= {"ok", "output", "invocation_id", "node", "cold_start", "duration_ms", "error"}
    assert first["node"] in ("host-1", "host-2") and first["duration_ms"] > 0
    assert [f["spec"]["name"] for f in json.loads(listed.stdout)] == ["hello"]


def test_plain_output_and_data_file(cluster: launcher.ClusterInfo, tenant: str, tmp_path: Path) -> None:
    payload = tmp_path / "payload.txt"
    payload.write_text("a b c\n")
    hetfaas(cluster.state_dir, "deploy", str(EXAMPLES / "wordcount-exec"), "--tenant", tenant)
    result = hetfaas(
        cluster.state_dir, "invoke", "wordcount", "--tenant", tenant, "--data-file", str(payload), "-v"
    )
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"lines": 1, "words": 3, "bytes": 6}
    assert b"node=host-" in result.stderr and b"cold" in result.stderr


def test_binary_output_is_base64_in_json(cluster: launcher.ClusterInfo, tenant: str, tmp_path: Path) -> None:
    fn = make_function(
        tmp_path,
        "bin",
        'runtime = "python"\nhandler = "m:h"\n',
        {"m.py": "def h(p):\n    return b'\\xff\\x00' + p\n"},
    )
    hetfaas(cluster.state_dir, "deploy", str(fn), "--tenant", tenant)
    result = json.loads(
        hetfaas(cluster.state_dir, "invoke", "bin", "--tenant", tenant, "--data", "x", "--json").stdout
    )
    assert result["output_encoding"] == "base64" and base64.b64decode(result["output"]) == b"\xff\x00x"


def test_errors_exit_non_zero(cluster: launcher.ClusterInfo, tenant: str, tmp_path: Path) -> None:
    missing = hetfaas(cluster.state_dir, "invoke", "ghost", "--tenant", tenant)
    missing_json = hetfaas(cluster.state_dir, "invoke", "ghost", "--tenant", tenant, "--json")
    bad = make_function(tmp_path, "bad", 'runtime = "python"\nhandlr = "m:f"\n', {})
    invalid = hetfaas(cluster.state_dir, "deploy", str(bad))

    assert missing.returncode == 3 and b"error: not_found:" in missing.stderr
    body = json.loads(missing_json.stdout)
    assert missing_json.returncode == 3 and body["ok"] is False and body["error"]["code"] == "not_found"
    assert invalid.returncode == 8 and b"unknown key 'handlr'" in invalid.stderr


def test_rm_removes_a_function_and_says_so(cluster: launcher.ClusterInfo, tenant: str) -> None:
    hetfaas(cluster.state_dir, "deploy", str(EXAMPLES / "hello-python"), "--tenant", tenant)
    removed = hetfaas(cluster.state_dir, "rm", "hello", "--tenant", tenant)
    listed = hetfaas(cluster.state_dir, "ls", "--tenant", tenant, "--json")
    again = hetfaas(cluster.state_dir, "rm", "hello", "--tenant", tenant)
    hetfaas(cluster.state_dir, "deploy", str(EXAMPLES / "hello-python"), "--tenant", tenant)
    as_json = hetfaas(cluster.state_dir, "rm", "hello", "--tenant", tenant, "--json")

    assert removed.returncode == 0 and removed.stdout.startswith(f"removed {tenant}/hello (sha256-".encode())
    assert json.loads(listed.stdout) == []
    assert again.returncode == 3 and b"not_found: function 'hello' is not deployed" in again.stderr
    body = json.loads(as_json.stdout)
    assert as_json.returncode == 0 and body["function"]["spec"]["name"] == "hello"


def test_logs_prints_the_function_s_output(
    cluster: launcher.ClusterInfo, tenant: str, tmp_path: Path
) -> None:
    talker = 'def handle(payload):\n    print("said", payload.decode(), flush=True)\n    return b""\n'
    fn = make_function(
        tmp_path, "talker", 'runtime = "python"\nhandler = "main:handle"\n', {"main.py": talker}
    )
    hetfaas(cluster.state_dir, "deploy", str(fn), "--tenant", tenant)
    for word in ("one", "two", "three"):
        hetfaas(cluster.state_dir, "invoke", "talker", "--tenant", tenant, "--data", word)
    printed = hetfaas(cluster.state_dir, "logs", "talker", "--tenant", tenant, "--tail", "2")
    unknown = hetfaas(cluster.state_dir, "logs", "ghost", "--tenant", tenant)

    assert printed.returncode == 0 and printed.stdout == b"said two\nsaid three\n", printed
    assert unknown.returncode == 3 and b"not_found" in unknown.stderr


def test_tenant_limits_and_the_replica_table(cluster: launcher.ClusterInfo, tenant: str) -> None:
    limited = hetfaas(cluster.state_dir, "tenant", "set", tenant, "--max-concurrency", "3", "--json")
    plain = hetfaas(cluster.state_dir, "tenant", "set", tenant, "--max-concurrency", "5", "--weight", "3")
    invalid = hetfaas(cluster.state_dir, "tenant", "set", tenant, "--max-concurrency", "0")
    heavy = hetfaas(cluster.state_dir, "tenant", "set", tenant, "--max-concurrency", "5", "--weight", "1001")
    status = hetfaas(cluster.state_dir, "status")

    assert json.loads(limited.stdout) == {"tenant": tenant, "max_concurrency": 3, "weight": 1}
    assert plain.stdout.decode().strip() == f"tenant {tenant}: max_concurrency 5, weight 3"
    assert invalid.returncode == 2 and b"--max-concurrency" in invalid.stderr
    assert heavy.returncode == 2 and b"--weight" in heavy.stderr
    table = status.stdout.decode()
    assert "REPLICA" in table and "QUEUED" in table and "scheduler-0 *" in table, table


def test_no_cluster_is_a_clear_error(tmp_path: Path) -> None:
    result = hetfaas(tmp_path / "nothing", "ls")
    assert result.returncode == 3 and b"no cluster found" in result.stderr and b"hetfaas up" in result.stderr


def test_unreachable_nats_fails_fast_and_plainly(tmp_path: Path) -> None:
    env = {**os.environ, "HETFAAS_NATS_URL": f"nats://127.0.0.1:{free_port()}"}
    result = subprocess.run(
        [*HETFAAS, "invoke", "hello"], capture_output=True, env=env, timeout=20, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 7
    assert result.stderr.startswith(b"error: unavailable: cannot reach the cluster at nats://127.0.0.1:")
    assert b"Traceback" not in result.stderr


@pytest.fixture
def own_state(tmp_path: Path) -> Iterator[Path]:
    """A state directory for a cluster the test starts itself; whatever it leaves running is stopped."""
    state = tmp_path / "state"
    yield state
    info = launcher.read_cluster(state)
    if info is not None:
        launcher.stop(info)


def test_up_is_idempotent_and_down_stops_everything(own_state: Path) -> None:
    state = own_state
    first = hetfaas(state, "up", "--hosts", "1")
    again = hetfaas(state, "up", "--hosts", "1")
    status = hetfaas(state, "status", "--json")
    info = launcher.read_cluster(state)
    pids = dict(info.processes)
    down = hetfaas(state, "down")
    down_again = hetfaas(state, "down")

    assert first.returncode == 0, first.stderr
    assert b"cluster is up" in first.stdout and b"host-1" in first.stdout
    assert again.returncode == 0 and b"already running" in again.stdout
    body = json.loads(status.stdout)
    assert body["state_dir"] == str(state) and [n["node_id"] for n in body["nodes"]] == ["host-1"]
    assert body["nodes"][0]["healthy"] and all(body["processes"].values())
    verifiers = {"verifier-0"} if os.geteuid() == 0 else set()  # the verifier needs root
    assert set(pids) == {"nats", "etcd", "scheduler-0", "host-1"} | verifiers
    assert down.returncode == 0 and f"stopped {len(pids)} process(es)".encode() in down.stdout
    assert not any(launcher.is_ours(pid, state) for pid in pids.values())
    assert b"no cluster running" in down_again.stdout
    assert (state / "logs" / "host-1.log").exists() and (state / "data" / "etcd").is_dir()


def test_functions_survive_down_and_up(own_state: Path) -> None:
    state = own_state
    assert hetfaas(state, "up", "--hosts", "1").returncode == 0
    assert hetfaas(state, "deploy", str(EXAMPLES / "hello-python")).returncode == 0
    assert hetfaas(state, "down").returncode == 0
    restarted = hetfaas(state, "up", "--hosts", "1")
    listed = json.loads(hetfaas(state, "ls", "--json").stdout)
    result = json.loads(hetfaas(state, "invoke", "hello", "--data", "again", "--json").stdout)

    assert restarted.returncode == 0, restarted.stderr
    assert [f["spec"]["name"] for f in listed] == ["hello"], "etcd kept the function"
    assert result["ok"] and json.loads(result["output"])["greeting"] == "hello, again!", (
        "JetStream kept the code"
    )


@pytest.mark.privileged
def test_status_shows_the_pools_and_down_leaves_no_cgroup_behind(own_state: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("sandboxes (and their cgroups) need root")
    state = own_state
    assert hetfaas(state, "up", "--hosts", "1").returncode == 0
    status = hetfaas(state, "status")
    info = launcher.read_cluster(state)
    ours = launcher.cgroup_parent(info)
    existed = cgroup_dirs_named(ours)
    os.kill(info.processes["host-1"], signal.SIGKILL)  # a crashed node leaves its slots behind
    down = hetfaas(state, "down")

    assert b"SHARD" in status.stdout and b"prewarm" in status.stdout, status.stdout.decode()
    assert existed, "the node made its cgroups under the cluster's own parent"
    assert down.returncode == 0
    assert cgroup_dirs_named(ours) == [], "down removed every cgroup of the cluster"
