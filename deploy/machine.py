"""One machine of a planned cluster: what `hetfaas cluster plan` writes for it (`machine.json` and
the files beside it) and what `hetfaas machine run` makes of it (nats-server's config, etcd's
command line, each service's settings). Pure: paths in, texts and Structs out.

A machine directory holds every path relative to itself, so it can be copied anywhere (the
install step puts it in /var/lib/hetfaas/<machine>); the settings are rendered at each start
with the directory's real location.
"""

import ipaddress
import sys
from pathlib import Path
from typing import Any, Literal

import msgspec

from deploy import services
from dpu_node.settings import DpuNodeSettings
from host_node.settings import HostNodeSettings
from scheduler.settings import SchedulerSettings
from verifier_service.settings import VerifierSettings

MachineRole = Literal["nats", "etcd", "scheduler", "verifier", "host", "dpu"]
MACHINE_ROLES: tuple[MachineRole, ...] = ("nats", "etcd", "scheduler", "verifier", "host", "dpu")
SERVICE_ROLES: tuple[MachineRole, ...] = ("verifier", "scheduler", "host", "dpu")  # start order
MODULES = {"scheduler": "scheduler", "verifier": "verifier_service", "host": "host_node", "dpu": "dpu_node"}
MACHINE_FILE = "machine.json"


class Ports(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ports every machine uses (each machine has its own address, so one set serves all)."""

    nats: int = 4222
    nats_cluster: int = 6222
    nats_monitor: int = 8222  # nats-server's /healthz
    etcd: int = 2379
    etcd_peer: int = 2380
    scheduler: int = 9101  # each service's /healthz, /readyz and /metrics
    host: int = 9102
    dpu: int = 9103
    verifier: int = 9104


class Peer(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    address: str


class MachineConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`machine.json`: who this machine is in its cluster and who its peers are."""

    cluster: str
    name: str
    address: str  # an IP address or a DNS name the other machines reach it by
    roles: list[MachineRole]
    ports: Ports = Ports()
    nats: list[Peer]  # every machine running nats-server (routes; the services' server list)
    etcd: list[Peer]  # every etcd member
    bundle_replicas: int = 1
    index: int = 0  # its place in the SPEC: which NATS server it tries first, if it runs none
    # Each role's settings beyond the plan's (the SPEC's `[machine.settings.<role>]` tables)
    settings: dict[str, dict[str, Any]] = {}

    @property
    def etcd_server_name(self) -> str:
        """The name every etcd member's certificate carries: services check etcd against it
        (gRPC cannot take one name from a list of addresses)."""
        return f"etcd.{self.cluster}.hetfaas"

    def node_id(self, role: MachineRole) -> str:
        """The service's identity: the machine's name (a DPU beside a host node: `<name>-dpu`)."""
        return f"{self.name}-dpu" if role == "dpu" and "host" in self.roles else self.name

    def nats_urls(self) -> str:
        """Every server, this machine's own first; a machine without one starts at the
        server its place in the SPEC picks, so the machines spread over the servers."""
        names = [peer.name for peer in self.nats]
        first = names.index(self.name) if self.name in names else self.index % len(names)
        ordered = self.nats[first:] + self.nats[:first]
        return ", ".join(f"tls://{peer.address}:{self.ports.nats}" for peer in ordered)

    def etcd_endpoints(self) -> list[str]:
        return [f"https://{peer.address}:{self.ports.etcd}" for peer in self.etcd]


def read(root: Path) -> MachineConfig:
    try:
        return msgspec.json.decode((root / MACHINE_FILE).read_bytes(), type=MachineConfig)
    except FileNotFoundError:
        raise MachineError(
            f"{root} is not a machine directory (no {MACHINE_FILE}): see `hetfaas cluster plan`"
        ) from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MachineError(f"{root / MACHINE_FILE}: {exc}") from None


class MachineError(Exception):
    pass


def bind_host(address: str) -> str:
    """What a server listens on: the machine's address, or every address when it is a name."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return "0.0.0.0"
    return address


class Files:
    """The files of a machine directory, by what they are (relative names are the plan's)."""

    def __init__(self, root: Path):
        self.root = root

    ca = property(lambda self: self.root / "tls" / "ca.pem")
    cert = property(lambda self: self.root / "tls" / "machine.crt")
    key = property(lambda self: self.root / "tls" / "machine.key")
    client_pem = property(lambda self: self.root / "tls" / "client.pem")  # cert and key, for etcd
    accounts = property(lambda self: self.root / "nats" / "accounts.json")
    etcd_root = property(lambda self: self.root / "etcd" / "root.etcd")
    etcd_users = property(lambda self: self.root / "etcd" / "users.json")
    etcd_jwt_key = property(lambda self: self.root / "etcd" / "jwt.key")
    etcd_jwt_pub = property(lambda self: self.root / "etcd" / "jwt.pub")
    signing_key = property(lambda self: self.root / "keys" / "signing.pem")
    trusted_keys = property(lambda self: self.root / "keys" / "trusted.json")

    def creds(self, role: str) -> Path:
        return self.root / "creds" / f"{role}.creds"

    def etcd_login(self, role: str) -> Path:
        return self.root / "etcd" / f"{role}.etcd"


class NatsAccounts(msgspec.Struct, frozen=True, kw_only=True):
    """nats-server's operator-mode part: the operator, the system account, accounts to start with."""

    operator_jwt: str
    system_account: str
    preload: dict[str, str]


class EtcdUser(msgspec.Struct, frozen=True, kw_only=True):
    role: str
    name: str
    password: str


def nats_config(config: MachineConfig, files: Files, data: Path, accounts: NatsAccounts) -> str:
    """nats-server's config: TLS for clients, JetStream, operator mode, and (with peers) a
    cluster whose routes authenticate each other by the plan's certificates (mutual TLS)."""
    host, ports = bind_host(config.address), config.ports
    tls = f'cert_file: "{files.cert}", key_file: "{files.key}", ca_file: "{files.ca}", timeout: 2'
    lines = [
        f'server_name: "{config.name}"',
        f'listen: "{host}:{ports.nats}"',
        f'http: "127.0.0.1:{ports.nats_monitor}"',  # monitoring shows every connection: local only
        f"max_payload: {services.NATS_MAX_PAYLOAD}",
        f'jetstream {{ store_dir: "{data / "jetstream"}" }}',
        f"tls {{ {tls} }}",
    ]
    if len(config.nats) > 1:
        routes = ", ".join(
            f'"nats-route://{peer.address}:{ports.nats_cluster}"'
            for peer in config.nats
            if peer.name != config.name
        )
        lines.append(
            f'cluster {{ name: "{config.cluster}", listen: "{host}:{ports.nats_cluster}", '
            f"routes: [{routes}], tls {{ {tls}, verify: true }} }}"
        )
    preload = "".join(f'  {key}: "{jwt}"\n' for key, jwt in accounts.preload.items())
    lines += [
        f'operator: "{accounts.operator_jwt}"',
        f'system_account: "{accounts.system_account}"',
        f'resolver: {{ type: full, dir: "{data / "nats-accounts"}", allow_delete: false, interval: "2m" }}',
        f"resolver_preload: {{\n{preload}}}",
    ]
    return "\n".join(lines) + "\n"


def etcd_argv(config: MachineConfig, files: Files, data: Path) -> list[str]:
    """etcd as a member of the plan's cluster: TLS between members and to clients, clients
    admitted only with a certificate of the cluster's CA, JWT auth tokens (valid on every
    member, where simple tokens live in one member's memory), and a data directory that makes
    a restart rejoin (etcd ignores the initial-cluster flags once it has data)."""
    host, ports = bind_host(config.address), config.ports
    own = f"https://{config.address}"
    peers = ",".join(f"{peer.name}=https://{peer.address}:{ports.etcd_peer}" for peer in config.etcd)
    token = f"jwt,pub-key={files.etcd_jwt_pub},priv-key={files.etcd_jwt_key},sign-method=ES256,ttl=10m"
    return [
        services.etcd_binary(),
        "--name", config.name,
        "--data-dir", str(data / "etcd"),
        "--listen-client-urls", f"https://{host}:{ports.etcd}",
        "--advertise-client-urls", f"{own}:{ports.etcd}",
        "--listen-peer-urls", f"https://{host}:{ports.etcd_peer}",
        "--initial-advertise-peer-urls", f"{own}:{ports.etcd_peer}",
        "--initial-cluster", peers,
        "--initial-cluster-state", "new",
        "--initial-cluster-token", f"hetfaas-{config.cluster}",
        "--cert-file", str(files.cert), "--key-file", str(files.key),
        "--client-cert-auth", "--trusted-ca-file", str(files.ca),
        "--peer-cert-file", str(files.cert), "--peer-key-file", str(files.key),
        "--peer-client-cert-auth", "--peer-trusted-ca-file", str(files.ca),
        "--auth-token", token,
        "--bcrypt-cost", "4",  # 256-bit random passwords (deploy/etcd_auth.py)
        "--log-level", "warn",
    ]  # fmt: skip


def service_settings(config: MachineConfig, role: MachineRole, files: Files, data: Path) -> msgspec.Struct:
    """A service role's settings on this machine: its identity's files, every NATS server and
    etcd member, its health endpoint, then what the SPEC set for it."""
    name = config.node_id(role)
    listen = f"{bind_host(config.address)}:{getattr(config.ports, role)}"
    nats = {
        "nats_url": config.nats_urls(),
        "nats_creds": str(files.creds(role)),
        "nats_ca": str(files.ca),
        "metrics_listen": listen,
        "state_dir": str(data),
        "trace_stream": True,  # spans from every machine in one place (fabric.trace_stream)
    }
    etcd = {
        "etcd_endpoints": config.etcd_endpoints(),
        "etcd_creds": str(files.etcd_login(role)),
        "etcd_ca": str(files.ca),
        "etcd_client_cert": str(files.client_pem),
        "etcd_server_name": config.etcd_server_name,
    }
    extra = dict(config.settings.get(role, {}))
    fields: dict[str, Any]
    if role == "verifier":
        fields = {"verifier_id": name, "key_path": str(files.signing_key), **nats}
    elif role == "scheduler":
        fields = {"scheduler_id": name, "bundle_replicas": config.bundle_replicas, **nats, **etcd}
    else:
        trusted = msgspec.json.decode(files.trusted_keys.read_bytes(), type=list[str])
        fields = {"node_id": name, **nats, **etcd}
        if role == "dpu":
            fields["trusted_keys"] = trusted
        else:
            fields["work_dir"] = str(data / "host")
            own_cgroups = {"cgroup_parent": f"hetfaas-{config.cluster}-{config.name}"}
            extra["sandbox"] = own_cgroups | extra.get("sandbox", {})
            if "ebpf" in extra:  # a host that takes eBPF functions trusts the plan's keys
                extra["ebpf"] = {"trusted_keys": trusted} | extra["ebpf"]
    try:
        return msgspec.convert(fields | extra, SETTINGS[role])
    except msgspec.ValidationError as exc:
        raise MachineError(f"the {role} settings of machine {config.name}: {exc}") from None


SETTINGS: dict[str, type[msgspec.Struct]] = {
    "scheduler": SchedulerSettings,
    "verifier": VerifierSettings,
    "host": HostNodeSettings,
    "dpu": DpuNodeSettings,
}


def service_argv(role: MachineRole, settings_path: Path) -> list[str]:
    return [sys.executable, "-m", MODULES[role], "--config", str(settings_path)]
