"""The CLI as kubectl and faas-cli users expect it, against a real cluster: -o json|yaml|wide,
errors as JSON, exit statuses per outcome, describe, get, logs -f and --since, invoke --async
with result (surviving its waiter's kill -9), version and shell completion."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from deploy import launcher
from tests.integration.conftest import EXAMPLES, make_function
from tests.integration.test_auth import create_tenant
from tests.integration.test_cli import HETFAAS, hetfaas

pytestmark = pytest.mark.integration

TALKER = """
import os, time

def handle(payload):
    print("said", payload.decode(), flush=True)
    if payload.startswith(b"slow"):
        time.sleep(4)
    if payload == b"hang":
        time.sleep(30)
    if payload == b"fail":
        raise RuntimeError("asked to fail")
    return os.urandom(8).hex().encode()  # another answer for every run
"""


@pytest.fixture
def talker(cluster: launcher.ClusterInfo, tenant: str, tmp_path: Path) -> str:
    manifest = 'runtime = "python"\nhandler = "main:handle"\ntimeout_ms = 10000\n'
    fn = make_function(tmp_path, "talker", manifest, {"main.py": TALKER})
    assert hetfaas(cluster.state_dir, "deploy", str(fn), "--tenant", tenant).returncode == 0
    return tenant


def test_every_format_of_ls_and_get(cluster: launcher.ClusterInfo, tenant: str) -> None:
    hetfaas(cluster.state_dir, "deploy", str(EXAMPLES / "hello-python"), "--tenant", tenant)
    as_json = hetfaas(cluster.state_dir, "ls", "--tenant", tenant, "-o", "json")
    synonym = hetfaas(cluster.state_dir, "get", "--tenant", tenant, "--json")
    as_yaml = hetfaas(cluster.state_dir, "get", "--tenant", tenant, "-o", "yaml")
    wide = hetfaas(cluster.state_dir, "ls", "--tenant", tenant, "-o", "wide")
    clash = hetfaas(cluster.state_dir, "ls", "--json", "-o", "yaml")

    [record] = json.loads(as_json.stdout)
    assert record["spec"]["name"] == "hello" and json.loads(synonym.stdout) == [record]
    text = as_yaml.stdout.decode()
    assert (
        text.startswith("- spec:\n")
        and "    name: hello\n" in text
        and f"  bundle_digest: {record['bundle_digest']}" in text
    )
    header = wide.stdout.decode().splitlines()[0]
    assert "CONCURRENCY" in header and "DEPLOYED" in header and "hello" in wide.stdout.decode()
    assert clash.returncode == 2 and b"disagree" in clash.stderr


def test_errors_are_json_under_o_json_and_exit_statuses_name_the_outcome(
    cluster: launcher.ClusterInfo, talker: str, tmp_path: Path
) -> None:
    missing = hetfaas(cluster.state_dir, "describe", "ghost", "--tenant", talker, "-o", "json")
    missing_yaml = hetfaas(cluster.state_dir, "rm", "ghost", "--tenant", talker, "-o", "yaml")
    failed = hetfaas(cluster.state_dir, "invoke", "talker", "--tenant", talker, "--data", "fail")
    late = hetfaas(
        cluster.state_dir, "invoke", "talker", "--tenant", talker, "--data", "hang", "--timeout-ms", "1500"
    )
    outsider = create_tenant(cluster, f"{talker}o", tmp_path)
    forbidden = hetfaas(cluster.state_dir, "--creds", outsider, "ls", "--tenant", talker, "-o", "json")
    bad = hetfaas(cluster.state_dir, "invoke", "no/such", "--tenant", talker, "-o", "json")
    env = {"HETFAAS_NATS_URL": "nats://127.0.0.1:9", "HETFAAS_CREDS": cluster.nats_creds}
    away = subprocess.run(
        [*HETFAAS, "ls", "-o", "json"], capture_output=True, env={**os.environ, **env}, timeout=30
    )

    assert missing.returncode == 3 and json.loads(missing.stdout)["error"]["code"] == "not_found"
    assert missing_yaml.returncode == 3 and missing_yaml.stdout.startswith(b"error:\n  code: not_found\n")
    assert failed.returncode == 1 and b"error: function_error:" in failed.stderr
    assert late.returncode == 6 and b"error: timeout:" in late.stderr
    assert forbidden.returncode == 4 and json.loads(forbidden.stdout)["error"]["code"] == "unauthorized"
    assert bad.returncode == 8 and json.loads(bad.stdout)["error"]["code"] == "bad_request"
    assert away.returncode == 7 and json.loads(away.stdout)["error"]["code"] == "unavailable"


def test_describe_shows_the_spec_where_it_is_warm_and_recent_invocations(
    cluster: launcher.ClusterInfo, talker: str
) -> None:
    runs = [
        json.loads(
            hetfaas(
                cluster.state_dir, "invoke", "talker", "--tenant", talker, "--data", d, "-o", "json"
            ).stdout
        )
        for d in ("one", "two", "fail")
    ]
    deadline = time.monotonic() + 15
    while True:  # the instance is idle at once; the scheduler hears so at the node's next heartbeat
        body = json.loads(
            hetfaas(cluster.state_dir, "describe", "talker", "--tenant", talker, "-o", "json").stdout
        )
        if body["warm"] or time.monotonic() > deadline:
            break
    text = hetfaas(cluster.state_dir, "describe", "talker", "--tenant", talker).stdout.decode()

    assert body["function"]["spec"]["name"] == "talker" and body["revision"] > 0
    assert body["warm"] == {runs[0]["node"]: 1}, "its one instance, idle on the node that ran it"
    recent = {r["invocation_id"]: r for r in body["recent"]}
    assert set(recent) == {r["invocation_id"] for r in runs}
    assert recent[runs[0]["invocation_id"]]["cold_start"] is True
    assert recent[runs[2]["invocation_id"]]["error"] == "function_error"
    assert "asked to fail" in recent[runs[2]["invocation_id"]]["message"]
    assert f"Name:        {talker}/talker" in text and f"Warm on:     {runs[0]['node']} (1 idle)" in text
    assert "1 error(s) in the last 3 invocation(s)" in text


def test_logs_since_and_follow(cluster: launcher.ClusterInfo, talker: str) -> None:
    hetfaas(cluster.state_dir, "invoke", "talker", "--tenant", talker, "--data", "before")
    recent = hetfaas(cluster.state_dir, "logs", "talker", "--tenant", talker, "--since", "1h")
    env = {**os.environ, "HETFAAS_STATE_DIR": str(cluster.state_dir)}
    follow = subprocess.Popen(
        [*HETFAAS, "logs", "talker", "--tenant", talker, "-f"], stdout=subprocess.PIPE, env=env
    )
    try:
        assert follow.stdout is not None
        assert follow.stdout.readline() == b"said before\n", "the last lines first"
        hetfaas(cluster.state_dir, "invoke", "talker", "--tenant", talker, "--data", "after")
        assert follow.stdout.readline() == b"said after\n", "then each new line, once"
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(timeout=10)

    assert recent.returncode == 0 and recent.stdout == b"said before\n"
    assert follow.returncode == 0, "Ctrl-C ends -f quietly"


def test_async_invoke_and_its_result_survive_the_waiters_kill(
    cluster: launcher.ClusterInfo, talker: str
) -> None:
    started = hetfaas(cluster.state_dir, "invoke", "talker", "--tenant", talker, "--data", "slow", "--async")
    invocation_id = started.stdout.decode().strip()
    record_path = Path(cluster.state_dir) / "async" / f"{invocation_id}.json"
    waiter = json.loads(record_path.read_text())["waiter"]
    pending = hetfaas(cluster.state_dir, "result", invocation_id, "-o", "json")
    os.kill(waiter, signal.SIGKILL)  # the invocation is on its way (or not yet): either way, not lost
    answered = hetfaas(cluster.state_dir, "result", invocation_id, "--wait", "30", "-o", "json")
    again = hetfaas(cluster.state_dir, "result", invocation_id)
    unknown = hetfaas(cluster.state_dir, "result", "no-such-id")
    logs = hetfaas(cluster.state_dir, "logs", "talker", "--tenant", talker)

    assert started.returncode == 0 and len(invocation_id) > 8
    assert json.loads(pending.stdout) == {"invocation_id": invocation_id, "status": "pending"}
    body = json.loads(answered.stdout)
    assert answered.returncode == 0 and body["ok"] and body["invocation_id"] == invocation_id
    assert again.returncode == 0 and again.stdout.decode() == body["output"]
    assert logs.stdout.decode().count("said slow") == 1, "it ran once, however many waiters sent it"
    assert unknown.returncode == 3


def test_version_and_completion(cluster: launcher.ClusterInfo) -> None:
    version = hetfaas(cluster.state_dir, "version", "-o", "json")
    script = hetfaas(cluster.state_dir, "completion", "bash")
    env = {
        **os.environ,
        "_HETFAAS_COMPLETE": "bash_complete",
        "COMP_WORDS": "hetfaas desc",
        "COMP_CWORD": "1",
    }
    completed = subprocess.run([*HETFAAS], capture_output=True, env=env, timeout=30)

    body = json.loads(version.stdout)
    assert body["client"]["wire"] == 1 and body["client"]["version"]
    assert sum(body["cluster"]["nodes"].values()) == 2 and sum(body["cluster"]["schedulers"].values()) == 1
    assert script.returncode == 0 and b"_HETFAAS_COMPLETE=bash_complete" in script.stdout
    assert b"describe" in completed.stdout, completed
    assert hetfaas(cluster.state_dir, "version", "--client").stdout.startswith(b"Client: hetfaas ")
