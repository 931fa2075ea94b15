"""`hetfaas cluster plan SPEC.toml --out DIR`: everything each machine of a cluster needs, and the
operator's context, from one description of the machines.

    [cluster]                      # optional
    name = "prod"
    [[machine]]
    name = "m1"
    address = "10.0.0.1"           # an IP address or a DNS name
    roles = ["nats", "etcd", "scheduler"]
    [machine.settings.host]        # optional: a role's settings beyond the plan's
    capacity = 32

DIR/<machine>/ holds that machine's identities and nothing else's (its NATS credentials and etcd
logins per role, its certificate, the verifier's signing key on verifier machines only, the
trusted keys on node machines); DIR/operator/ is the operator's context (`HETFAAS_CONTEXT`) and
keeps the cluster's authority: the CA's key, the NATS operator and account keys, every etcd
login, the signing keys. Planning again into the same DIR keeps all of it (same CA, same
identities), so machines can be added; `--rotate-signing-key` adds a verifier key that signs
from then on while nodes still trust the older ones (approvals they signed stay valid), and
`--retire-signing-keys` drops the older ones once everything is signed again.
"""

import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from deploy import authority, etcd_auth, launcher, tls
from deploy.machine import (
    MACHINE_FILE,
    EtcdUser,
    Files,
    MachineConfig,
    MachineRole,
    NatsAccounts,
    Peer,
    Ports,
)
from fabric import credentials, signing
from schemas.permissions import Role

OPERATOR = "operator"
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
ETCD_ROLES: tuple[Role, ...] = ("scheduler", "host", "dpu")  # the services that reach etcd


class MachineSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    address: str
    roles: list[MachineRole]
    settings: dict[str, dict[str, Any]] = {}


class ClusterSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str = "hetfaas"
    ports: Ports = Ports()


class ClusterSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    cluster: ClusterSection = ClusterSection()
    machine: list[MachineSpec] = []


class PlanError(Exception):
    pass


class PlanContext(msgspec.Struct, kw_only=True):
    """DIR/operator/machines.json: the machines and their roles, for `hetfaas status`."""

    cluster: str
    ports: Ports
    machines: list[MachineSpec]


def read_spec(path: Path) -> ClusterSpec:
    try:
        spec = msgspec.toml.decode(path.read_bytes(), type=ClusterSpec)
    except OSError as exc:
        raise PlanError(f"cannot read {path}: {exc.strerror}") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise PlanError(f"{path}: {exc}") from None
    if problems := spec_problems(spec):
        raise PlanError(f"{path}: " + "; ".join(problems))
    return spec


def spec_problems(spec: ClusterSpec) -> list[str]:
    """What makes a SPEC unusable (pure)."""
    problems = []
    names = [m.name for m in spec.machine]
    if not spec.machine:
        problems.append("no [[machine]] is listed")
    if not NAME_RE.match(spec.cluster.name):
        problems.append(f"cluster name {spec.cluster.name!r} is not a DNS label (a-z, 0-9, -)")
    for machine in spec.machine:
        if not NAME_RE.match(machine.name) or machine.name == OPERATOR:
            problems.append(f"machine name {machine.name!r} must be a DNS label and not 'operator'")
        if not machine.address.strip():
            problems.append(f"machine {machine.name!r} has no address")
        if not machine.roles or len(set(machine.roles)) != len(machine.roles):
            problems.append(f"machine {machine.name!r} must list its roles, each once")
        if unknown := set(machine.settings) - set(machine.roles):
            problems.append(
                f"machine {machine.name!r} has settings for roles it does not run: {sorted(unknown)}"
            )
    if duplicated := sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"machine names used twice: {duplicated}")
    addresses = [m.address for m in spec.machine]
    if duplicated := sorted({a for a in addresses if addresses.count(a) > 1}):
        problems.append(f"addresses used twice: {duplicated}")
    for role in ("nats", "etcd", "scheduler"):
        if not any(role in m.roles for m in spec.machine):
            problems.append(f"no machine runs {role}")
    if (etcd := sum("etcd" in m.roles for m in spec.machine)) % 2 == 0 and etcd:
        problems.append(f"{etcd} etcd members: an even number tolerates no more failures than one fewer")
    return problems


def plan(spec: ClusterSpec, out: Path, rotate: bool = False, retire: bool = False,
         progress: Callable[[str], None] = lambda _: None) -> list[Path]:  # fmt: skip
    """Write DIR/<machine>/ for every machine and DIR/operator/; the directories written."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    secrets = Secrets(out / OPERATOR, spec.cluster.name)
    if rotate:
        progress(f"new verifier signing key {secrets.add_signing_key()} signs from now on")
    if retire:
        progress(f"retired {secrets.retire_signing_keys()} older signing key(s)")
    nats = [Peer(name=m.name, address=m.address) for m in spec.machine if "nats" in m.roles]
    etcd = [Peer(name=m.name, address=m.address) for m in spec.machine if "etcd" in m.roles]
    configs = []
    for index, machine in enumerate(spec.machine):
        config = MachineConfig(
            index=index,
            cluster=spec.cluster.name,
            name=machine.name,
            address=machine.address,
            roles=machine.roles,
            ports=spec.cluster.ports,
            nats=nats,
            etcd=etcd,
            bundle_replicas=min(3, len(nats)),
            settings=machine.settings,
        )
        configs.append(config)
    # every service identity that reaches etcd: the members make these users
    users = [
        (role, config.node_id(role)) for config in configs for role in config.roles if role in ETCD_ROLES
    ]
    written = []
    for config in configs:
        progress(f"machine {config.name}: {', '.join(config.roles)}")
        written.append(secrets.write_machine(out / config.name, config, users))
    written.append(secrets.write_operator(spec, nats, etcd))
    secrets.save()
    return written


class Secrets:
    """The cluster's authority, kept in DIR/operator/secrets (0700, every file 0600)."""

    def __init__(self, operator_dir: Path, cluster: str):
        self.dir = operator_dir
        self.secrets = launcher.secrets_dir(operator_dir)
        self.cluster = cluster
        self.nats = authority.load_or_create(self.secrets)
        self.ca = tls.load_or_create_ca(self.secrets / "tls")
        self.signing_dir = self.secrets / "signing"
        if not self._signing_keys():
            self.add_signing_key()
        self._etcd_jwt()

    def save(self) -> None:
        authority.save(self.nats, self.secrets)

    # -- verifier signing keys: files key-<n>.pem, the highest n signs ---------------------

    def _signing_keys(self) -> list[Path]:
        """Newest first."""
        found = self.signing_dir.glob("key-*.pem") if self.signing_dir.is_dir() else []
        return sorted(found, key=lambda p: int(p.stem.split("-")[1]), reverse=True)

    def add_signing_key(self) -> str:
        keys = self._signing_keys()
        number = int(keys[0].stem.split("-")[1]) + 1 if keys else 1
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        credentials.write_secret(self.signing_dir / f"key-{number}.pem", pem.decode())
        return signing.key_id(key.public_key())

    def retire_signing_keys(self) -> int:
        older = self._signing_keys()[1:]
        for path in older:
            path.unlink()
        return len(older)

    def trusted_keys(self) -> list[str]:
        return [signing.public_key_text(_load_ed25519(path).public_key()) for path in self._signing_keys()]

    # -- etcd --------------------------------------------------------------------------------

    def _etcd_jwt(self) -> None:
        """The key every etcd member signs and checks auth tokens with (ES256)."""
        key_path = self.secrets / "etcd" / "jwt.key"
        if key_path.exists():
            return
        key = ec.generate_private_key(ec.SECP256R1())
        credentials.write_secret(key_path, tls.key_pem(key))
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        (self.secrets / "etcd" / "jwt.pub").write_bytes(public)

    def etcd_login(self, user: str) -> tuple[Path, credentials.EtcdLogin]:
        return etcd_auth.load_or_create_login(self.secrets / "etcd", user)

    # -- writing -----------------------------------------------------------------------------

    def write_machine(self, root: Path, config: MachineConfig, users: Sequence[tuple[Role, str]]) -> Path:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        files = Files(root)
        self._machine_tls(files, config)
        for role in config.roles:
            if role in ("scheduler", "verifier", "host", "dpu"):
                self._keep_creds(files.creds(role), role, config.node_id(role))
            if role in ETCD_ROLES:
                _, login = self.etcd_login(etcd_auth.user_name(role, config.node_id(role)))
                credentials.write_secret(files.etcd_login(role), credentials.etcd_login_text(login))
        if "nats" in config.roles:
            accounts = NatsAccounts(
                operator_jwt=self.nats.operator_jwt(),
                system_account=self.nats.system_account,
                preload=self.nats.account_jwts(),
            )
            credentials.write_secret(files.accounts, msgspec.json.encode(accounts).decode())
        if "etcd" in config.roles:
            self._etcd_member(files, users)
        if "verifier" in config.roles:
            credentials.write_secret(files.signing_key, self._signing_keys()[0].read_text())
        elif files.signing_key.exists():  # the machine no longer signs: it keeps no key
            files.signing_key.unlink()
        if {"host", "dpu"} & set(config.roles):
            files.trusted_keys.parent.mkdir(exist_ok=True, mode=0o700)
            files.trusted_keys.write_bytes(msgspec.json.encode(self.trusted_keys()))
        (root / MACHINE_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(config)))
        return root

    def _machine_tls(self, files: Files, config: MachineConfig) -> None:
        """The machine's certificate (its address and name; etcd's shared name on etcd
        members), a server's and a client's, and the CA that signed it."""
        files.ca.parent.mkdir(exist_ok=True, mode=0o700)
        shutil.copyfile(self.secrets / "tls" / "ca.pem", files.ca)
        hosts = [config.address, config.name] + (
            ["etcd." + self.cluster + ".hetfaas"] if "etcd" in config.roles else []
        )
        if not tls.covers(files.cert, hosts):
            tls.issue(self.ca, hosts, files.cert, files.key, f"machine {config.name}", client=True)
        credentials.write_secret(files.client_pem, files.cert.read_text() + files.key.read_text())

    def _keep_creds(self, path: Path, role: Role, name: str) -> None:
        """NATS credentials for `name` in `role`, issued once (a planned-again machine keeps them)."""
        if path.exists():
            kept = credentials.read_creds(path)
            if (kept.role, kept.name) == (role, role if role == "operator" else f"{role}:{name}"):
                return
        credentials.write_secret(path, self.nats.issue(role, name))

    def _etcd_member(self, files: Files, identities: Sequence[tuple[Role, str]]) -> None:
        """What an etcd member needs besides its certificate: the token key, root's login, and
        every service identity's login (a member holds all of etcd's data on its disk anyway;
        `hetfaas machine run` makes these users in etcd once the cluster has quorum)."""
        for name in ("jwt.key", "jwt.pub"):
            credentials.write_secret(files.root / "etcd" / name, (self.secrets / "etcd" / name).read_text())
        _, root = self.etcd_login(etcd_auth.ROOT)
        credentials.write_secret(files.etcd_root, credentials.etcd_login_text(root))
        users = []
        for role, name in identities:
            _, login = self.etcd_login(etcd_auth.user_name(role, name))
            users.append(EtcdUser(role=role, name=name, password=login.password))
        credentials.write_secret(files.etcd_users, msgspec.json.encode(users).decode())

    def write_operator(self, spec: ClusterSpec, nats: list[Peer], etcd: list[Peer]) -> Path:
        """DIR/operator: a state directory the CLI reads like `hetfaas up`'s (cluster.json, the
        operator's credentials), plus the machines for `status`."""
        ports = spec.cluster.ports
        credentials.write_secret(self.secrets / authority.SYSTEM_CREDS, self.nats.system_creds())
        creds = self.secrets / "creds" / "operator.creds"
        self._keep_creds(creds, "operator", "operator")
        root_path, _ = self.etcd_login(etcd_auth.ROOT)
        client = self.secrets / "tls" / "operator.pem"
        if not client.exists():
            key_path = self.secrets / "tls" / "operator.key"
            tls.issue(self.ca, [], client.with_suffix(".crt"), key_path, "operator", client=True)
            credentials.write_secret(client, client.with_suffix(".crt").read_text() + key_path.read_text())
        info = launcher.ClusterInfo(
            state_dir=str(self.dir),
            nats_url=", ".join(f"tls://{p.address}:{ports.nats}" for p in nats),
            etcd_endpoint="",
            etcd_endpoints=[f"https://{p.address}:{ports.etcd}" for p in etcd],
            nats_port=ports.nats,
            etcd_client_port=ports.etcd,
            etcd_peer_port=ports.etcd_peer,
            started_at=time.time(),
            nats_creds=str(creds),
            etcd_creds=str(root_path),
            nats_ca=str(self.secrets / "tls" / "ca.pem"),
            etcd_ca=str(self.secrets / "tls" / "ca.pem"),
            etcd_client_cert=str(client),
            etcd_server_name=f"etcd.{self.cluster}.hetfaas",
            planned=True,
        )
        launcher.write_cluster(info)
        context = PlanContext(cluster=spec.cluster.name, ports=ports, machines=spec.machine)
        (self.dir / "machines.json").write_bytes(msgspec.json.format(msgspec.json.encode(context)))
        (self.dir / "traces").mkdir(exist_ok=True)
        return self.dir


def _load_ed25519(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey), f"{path} holds an Ed25519 key"
    return key


def read_context(operator_dir: Path) -> PlanContext | None:
    try:
        return msgspec.json.decode((operator_dir / "machines.json").read_bytes(), type=PlanContext)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
