"""`hetfaas cluster plan`: what each machine's directory holds (and does not), the configs made
from it, planning again, and installing a machine (deploy/plan.py, deploy/machine.py)."""

import shutil
import subprocess
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner

from cli import cluster
from cli.main import cli
from deploy import launcher, machine, plan
from deploy.machine import Files
from fabric import credentials

SPEC = """
[cluster]
name = "lab"
[[machine]]
name = "m1"
address = "10.0.0.1"
roles = ["nats", "etcd", "scheduler"]
[[machine]]
name = "m2"
address = "10.0.0.2"
roles = ["nats", "etcd", "scheduler"]
[[machine]]
name = "m3"
address = "m3.example.net"
roles = ["nats", "etcd", "verifier"]
[[machine]]
name = "m4"
address = "10.0.0.4"
roles = ["host"]
[machine.settings.host]
capacity = 8
[[machine]]
name = "m5"
address = "10.0.0.5"
roles = ["host", "dpu"]
"""


def planned(tmp_path: Path, spec: str = SPEC, **options: bool) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(spec)
    out = tmp_path / "out"
    plan.plan(plan.read_spec(path), out, **options)
    return out


def spec_of(text: str) -> plan.ClusterSpec:
    return msgspec.toml.decode(text, type=plan.ClusterSpec)


def test_a_spec_that_cannot_make_a_cluster_says_why() -> None:
    bad = spec_of(
        """
        [[machine]]
        name = "a"
        address = "10.0.0.1"
        roles = ["nats", "etcd"]
        [machine.settings.host]
        capacity = 1
        [[machine]]
        name = "a"
        address = "10.0.0.1"
        roles = ["etcd"]
        """
    )
    problems = "; ".join(plan.spec_problems(bad))

    assert "machine names used twice: ['a']" in problems
    assert "addresses used twice" in problems
    assert "settings for roles it does not run: ['host']" in problems
    assert "no machine runs scheduler" in problems
    assert "2 etcd members" in problems
    assert plan.spec_problems(spec_of(SPEC)) == []


def test_each_machine_holds_its_own_identities_only(tmp_path: Path) -> None:
    out = planned(tmp_path)
    files = {name: Files(out / name) for name in ("m1", "m3", "m4", "m5")}

    assert sorted(p.name for p in (out / "m1" / "creds").iterdir()) == ["scheduler.creds"]
    assert sorted(p.name for p in (out / "m5" / "creds").iterdir()) == ["dpu.creds", "host.creds"]
    assert credentials.read_creds(files["m5"].creds("dpu")).name == "dpu:m5-dpu"
    assert files["m3"].signing_key.exists() and not files["m1"].signing_key.exists()
    assert files["m1"].etcd_root.exists() and not files["m4"].etcd_root.exists()
    assert not files["m4"].accounts.exists(), "only NATS servers hold the accounts"
    assert not (out / "m4" / "tls" / "ca.key").exists() and (out / "operator/secrets/tls/ca.key").exists()
    users = msgspec.json.decode(files["m1"].etcd_users.read_bytes(), type=list[machine.EtcdUser])
    assert sorted((u.role, u.name) for u in users) == [
        ("dpu", "m5-dpu"),
        ("host", "m4"),
        ("host", "m5"),
        ("scheduler", "m1"),
        ("scheduler", "m2"),
    ]
    for path in (out / "m5").rglob("*"):  # every secret is its owner's alone
        if path.is_file() and path.name not in ("machine.json", "ca.pem", "machine.crt", "trusted.json"):
            assert path.stat().st_mode & 0o077 == 0, path


def test_machines_spread_over_the_nats_servers_their_own_first(tmp_path: Path) -> None:
    out = planned(tmp_path)
    first = {name: machine.read(out / name).nats_urls().split(",")[0] for name in ("m1", "m2", "m4", "m5")}

    assert first == {
        "m1": "tls://10.0.0.1:4222",
        "m2": "tls://10.0.0.2:4222",
        "m4": "tls://10.0.0.1:4222",
        "m5": "tls://10.0.0.2:4222",
    }
    assert machine.read(out / "m4").bundle_replicas == 3


def test_configs_name_every_peer_and_require_certificates(tmp_path: Path) -> None:
    out = planned(tmp_path)
    config, files = machine.read(out / "m1"), Files(out / "m1")
    accounts = msgspec.json.decode(files.accounts.read_bytes(), type=machine.NatsAccounts)
    nats = machine.nats_config(config, files, tmp_path / "data", accounts)
    etcd = machine.etcd_argv(config, files, tmp_path / "data")

    assert '"nats-route://10.0.0.2:6222", "nats-route://m3.example.net:6222"' in nats
    assert "nats-route://10.0.0.1" not in nats and "verify: true" in nats
    assert 'listen: "10.0.0.1:4222"' in nats and 'http: "127.0.0.1:8222"' in nats
    assert etcd[etcd.index("--initial-cluster") + 1] == (
        "m1=https://10.0.0.1:2380,m2=https://10.0.0.2:2380,m3=https://m3.example.net:2380"
    )
    assert "--client-cert-auth" in etcd and "--peer-client-cert-auth" in etcd
    assert (
        etcd[etcd.index("--auth-token") + 1].startswith("jwt,")
        and "sign-method=ES256" in etcd[etcd.index("--auth-token") + 1]
    )
    named = machine.read(out / "m3")
    assert (
        machine.etcd_argv(named, Files(out / "m3"), tmp_path)[etcd.index("--listen-client-urls") + 1]
        == "https://0.0.0.0:2379"
    )


def test_service_settings_come_from_the_plan_and_the_spec(tmp_path: Path) -> None:
    out = planned(tmp_path)
    data = tmp_path / "data"
    host = machine.service_settings(machine.read(out / "m4"), "host", Files(out / "m4"), data)
    dpu = machine.service_settings(machine.read(out / "m5"), "dpu", Files(out / "m5"), data)
    scheduler = machine.service_settings(machine.read(out / "m1"), "scheduler", Files(out / "m1"), data)
    trusted = msgspec.json.decode((out / "m5" / "keys" / "trusted.json").read_bytes(), type=list[str])

    assert (host.node_id, host.capacity, host.metrics_listen) == ("m4", 8, "10.0.0.4:9102")
    assert host.sandbox.cgroup_parent == "hetfaas-lab-m4"
    assert host.etcd_endpoints == [
        "https://10.0.0.1:2379",
        "https://10.0.0.2:2379",
        "https://m3.example.net:2379",
    ]
    assert host.etcd_server_name == "etcd.lab.hetfaas" and host.etcd_client_cert.endswith("tls/client.pem")
    assert (dpu.node_id, dpu.trusted_keys) == ("m5-dpu", trusted) and len(trusted) == 1
    assert scheduler.bundle_replicas == 3 and scheduler.scheduler_id == "m1"
    with pytest.raises(machine.MachineError, match="the host settings of machine m4"):
        bad = msgspec.structs.replace(machine.read(out / "m4"), settings={"host": {"capacity": "lots"}})
        machine.service_settings(bad, "host", Files(out / "m4"), data)


def test_planning_again_keeps_the_cluster_and_rotates_signing_keys(tmp_path: Path) -> None:
    out = planned(tmp_path)
    ca, creds = (out / "m4/tls/ca.pem").read_bytes(), (out / "m4/creds/host.creds").read_bytes()
    first_key = (out / "m3/keys/signing.pem").read_bytes()

    planned(tmp_path, rotate=True)
    trusted_after_rotation = msgspec.json.decode((out / "m4/keys/trusted.json").read_bytes(), type=list[str])
    rotated_key = (out / "m3/keys/signing.pem").read_bytes()
    planned(tmp_path, retire=True)
    trusted_after_retiring = msgspec.json.decode((out / "m4/keys/trusted.json").read_bytes(), type=list[str])

    assert (out / "m4/tls/ca.pem").read_bytes() == ca and (out / "m4/creds/host.creds").read_bytes() == creds
    assert rotated_key != first_key and len(trusted_after_rotation) == 2, "old approvals stay valid"
    assert trusted_after_retiring == trusted_after_rotation[:1]
    assert (out / "m3/keys/signing.pem").read_bytes() == rotated_key


def test_the_operator_context_works_where_it_is_copied(tmp_path: Path) -> None:
    out = planned(tmp_path)
    moved = tmp_path / "elsewhere"
    shutil.copytree(out / "operator", moved)
    info = launcher.read_cluster(moved)

    assert info is not None and info.planned and info.state_dir == str(moved.resolve())
    assert info.nats_creds == str(moved.resolve() / "secrets/creds/operator.creds")
    assert info.nats_url == "tls://10.0.0.1:4222, tls://10.0.0.2:4222, tls://m3.example.net:4222"
    assert len(info.all_etcd_endpoints()) == 3


def test_a_context_that_is_not_one_is_refused_clearly(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--context", str(tmp_path), "ls"])
    planned_out = planned(tmp_path)
    plan_result = CliRunner().invoke(
        cli, ["cluster", "plan", str(tmp_path / "spec.toml"), "--out", str(planned_out)]
    )

    assert result.exit_code == 8 and "is not a cluster context" in result.output
    assert plan_result.exit_code == 0 and "export HETFAAS_CONTEXT=" in plan_result.output


def test_install_puts_the_directory_in_place_with_its_unit(tmp_path: Path) -> None:
    out = planned(tmp_path)
    (out / "m4" / "run").mkdir()
    (out / "m4" / "data").mkdir()  # neither travels: they are the running machine's
    root, units = tmp_path / "var", tmp_path / "units"
    target = cluster.install_files(out / "m4", "m4", root, units)
    again = cluster.install_files(out / "m4", "m4", root, units)  # safe to run twice
    unit = (units / cluster.UNIT).read_text()

    assert target == again == root / "m4" and (target / "machine.json").exists()
    assert not (target / "run").exists() and not (target / "data").exists()
    assert target.stat().st_mode & 0o077 == 0
    assert f"-m cli machine run {root}/%i" in unit and "KillMode=mixed" in unit
    if shutil.which("systemd-analyze"):
        verified = subprocess.run(
            ["systemd-analyze", "verify", str(units / cluster.UNIT)], capture_output=True, text=True
        )
        assert "hetfaas-machine@.service" not in verified.stderr, verified.stderr
