"""The local cluster: nats-server, etcd, scheduler replicas and host nodes as separate processes.

Everything lives in one state directory (configs, logs, data, traces); `cluster.json` there records
ports and pids so that `down`, `status` and the CLI can find the cluster again.
"""

import hashlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from deploy import authority, etcd_auth, services, tls
from dpu_node.settings import DpuNodeSettings
from ebpf_runtime.settings import EbpfRuntimeSettings
from fabric import credentials, signing
from fabric.settings import write_settings
from fabric.store import Store
from host_node.sandbox import cgroups
from host_node.sandbox.settings import SandboxSettings
from host_node.settings import HostNodeSettings
from scheduler.settings import SchedulerSettings
from schemas.permissions import Role
from verifier_service.attestation import load_or_create_key
from verifier_service.settings import VerifierSettings

CLUSTER_FILE = "cluster.json"


class ClusterInfo(msgspec.Struct, kw_only=True):
    state_dir: str
    nats_url: str
    etcd_endpoint: str
    nats_port: int
    etcd_client_port: int
    etcd_peer_port: int
    processes: dict[str, int] = {}  # name -> pid
    started_at: float = 0.0
    # The operator's NATS credentials (the CLI's default identity); empty: a cluster started
    # without authentication (benchmarks' baseline only).
    nats_creds: str = ""
    etcd_creds: str = ""  # etcd's root login (the operator's); empty: etcd without auth
    # The CA that signed nats-server's and etcd's certificates when the links are TLS ("": plain)
    nats_ca: str = ""
    etcd_ca: str = ""
    # A planned cluster's operator context (`hetfaas cluster plan`: DIR/operator) rather than
    # a local cluster: every etcd member, the operator's client certificate, etcd's name.
    planned: bool = False
    etcd_endpoints: list[str] = []
    etcd_client_cert: str = ""
    etcd_server_name: str = ""

    def all_etcd_endpoints(self) -> list[str]:
        return self.etcd_endpoints or [self.etcd_endpoint]


def default_state_dir() -> Path:
    if env := os.environ.get("HETFAAS_STATE_DIR"):
        return Path(env).resolve()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "hetfaas"


def read_cluster(state_dir: Path) -> ClusterInfo | None:
    try:
        info = msgspec.json.decode((state_dir / CLUSTER_FILE).read_bytes(), type=ClusterInfo)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    if info.planned and Path(info.state_dir) != state_dir.resolve():
        return _moved(info, state_dir.resolve())
    return info


def _moved(info: ClusterInfo, here: Path) -> ClusterInfo:
    """An operator context read from where it was copied to: its files are there now."""
    old = info.state_dir

    def moved(path: str) -> str:
        return str(here / Path(path).relative_to(old)) if path.startswith(old + "/") else path

    fields = ("nats_creds", "etcd_creds", "nats_ca", "etcd_ca", "etcd_client_cert")
    return msgspec.structs.replace(
        info, state_dir=str(here), **{name: moved(getattr(info, name)) for name in fields}
    )


def write_cluster(info: ClusterInfo) -> None:
    path = Path(info.state_dir) / CLUSTER_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(info)))
    tmp.replace(path)


def is_ours(pid: int, state_dir: Path) -> bool:
    """Alive, not a zombie, and started by this cluster (its argv names our state directory)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and str(state_dir).encode() in cmdline


def running_processes(info: ClusterInfo) -> dict[str, bool]:
    state_dir = Path(info.state_dir)
    return {name: is_ours(pid, state_dir) for name, pid in info.processes.items()}


def _port(previous: int | None) -> int:
    return services.free_port(previous)


def up(
    state_dir: Path,
    hosts: int = 2,
    schedulers: int = 1,
    verifiers: int = 0,
    dpus: int = 0,
    host_overrides: dict[str, Any] | None = None,
    scheduler_overrides: dict[str, Any] | None = None,
    dpu_overrides: dict[str, Any] | None = None,
    listen_host: str = services.LOOPBACK,
    progress: Callable[[str], None] = lambda _: None,
    secure: bool = True,
    use_tls: bool = False,
) -> ClusterInfo:
    """Start every process of a local cluster (the caller waits for the nodes to register).
    nats-server and etcd listen on `listen_host`: loopback, or an address that other network
    namespaces (the tests' stand-ins for other machines) can reach. Secure by default: NATS
    authenticates every connection and each identity has only its role's permissions
    (`secure=False` exists for measuring what that costs). `use_tls`: clients reach nats-server
    and etcd over TLS, with a CA and certificate made here (kept in the state directory)."""
    state_dir = state_dir.resolve()
    for sub in ("config", "logs", "data", "traces"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    previous = read_cluster(state_dir)  # reuse ports: etcd's data directory remembers its peer URL
    info = ClusterInfo(
        state_dir=str(state_dir),
        nats_url="",
        etcd_endpoint="",
        nats_port=_port(previous.nats_port if previous else None),
        etcd_client_port=_port(previous.etcd_client_port if previous else None),
        etcd_peer_port=_port(previous.etcd_peer_port if previous else None),
        started_at=time.time(),
    )
    info.nats_url = f"{'tls' if use_tls else 'nats'}://{listen_host}:{info.nats_port}"
    info.etcd_endpoint = f"{listen_host}:{info.etcd_client_port}"
    try:
        _start_nats_and_etcd(info, listen_host, secure, use_tls, progress)
        for i in range(schedulers):
            progress(f"starting scheduler-{i}")
            start_scheduler(info, i, scheduler_overrides or {})
        for i in range(1, hosts + 1):
            progress(f"starting host-{i}")
            start_host(info, i, host_overrides or {})
        _start_ebpf_services(info, verifiers, dpus, dpu_overrides or {}, progress)
    except BaseException:
        stop(info)
        raise
    return info


def _start_nats_and_etcd(
    info: ClusterInfo, listen_host: str, secure: bool, use_tls: bool, progress: Callable[[str], None]
) -> None:
    state_dir = Path(info.state_dir)
    auth_config = _secure(info) if secure else ""
    if use_tls:
        info.nats_ca = info.etcd_ca = tls.ensure(secrets_dir(state_dir) / "tls", [listen_host]).ca
    how = ", ".join((["authenticated"] if secure else []) + (["TLS"] if use_tls else []))
    progress(f"starting nats-server on port {info.nats_port}" + (f" ({how})" if how else ""))
    info.processes["nats"] = services.start_nats(
        info.nats_port,
        state_dir / "data" / "nats",
        state_dir / "config" / "nats.conf",
        state_dir / "logs" / "nats.log",
        listen_host,
        auth_config,
        _tls_files(info),
    ).pid
    write_cluster(info)
    progress(f"starting etcd on port {info.etcd_client_port}" + (f" ({how})" if how else ""))
    start_etcd(info)


def _secure(info: ClusterInfo) -> str:
    """The cluster's authority (created on its first start, kept after), the system account's
    and the operator's credentials; nats-server's operator-mode config."""
    state_dir = Path(info.state_dir)
    keys = authority.load_or_create(secrets_dir(state_dir))
    authority.save(keys, secrets_dir(state_dir))
    credentials.write_secret(secrets_dir(state_dir) / authority.SYSTEM_CREDS, keys.system_creds())
    info.nats_creds = str(issue_creds(info, "operator", "operator"))
    return authority.nats_config_lines(keys, state_dir / "data" / "nats-accounts")


def _tls_files(info: ClusterInfo) -> tls.TlsFiles | None:
    if not info.nats_ca:
        return None
    directory = Path(info.nats_ca).parent
    return tls.TlsFiles(
        ca=info.nats_ca, cert=str(directory / "server.pem"), key=str(directory / "server.key")
    )


def secrets_dir(state_dir: Path) -> Path:
    """The cluster's authority and every identity's credentials (0700; each file 0600)."""
    return state_dir / "secrets"


def issue_creds(info: ClusterInfo, role: Role, name: str) -> Path:
    """The credentials file of `name` in `role`, issued now unless it exists (a restarted
    service keeps its identity). Empty path on a cluster without authentication."""
    state_dir = Path(info.state_dir)
    path = secrets_dir(state_dir) / "creds" / f"{name}.creds"
    keys = authority.load(secrets_dir(state_dir))
    if keys is None:
        return Path()
    if not path.exists():
        credentials.write_secret(path, keys.issue(role, name))
        authority.save(keys, secrets_dir(state_dir))
    return path


def unrestricted_creds(info: ClusterInfo, name: str) -> str | None:
    """Credentials allowed everything, issued once per cluster: for tests that play a node or a
    buggy client, and for benchmarks' raw baselines (the bus itself being measured). Never a
    service's or a tenant's. None on a cluster without authentication."""
    directory = secrets_dir(Path(info.state_dir))
    keys = authority.load(directory)
    if keys is None or not info.nats_creds:
        return None
    path = directory / "creds" / f"{name}.creds"
    if not path.exists():
        credentials.write_secret(path, keys.issue_unrestricted(name))
        authority.save(keys, directory)
    return str(path)


def _nats_link(info: ClusterInfo, role: Role, name: str) -> dict[str, Any]:
    """The settings by which identity `name` in `role` reaches NATS."""
    creds = str(issue_creds(info, role, name)) if info.nats_creds else ""
    return {"nats_url": info.nats_url, "nats_creds": creds, "nats_ca": info.nats_ca}


def _links(info: ClusterInfo, role: Role, name: str) -> dict[str, Any]:
    """... and etcd, as its own etcd user (made now in etcd with its role's grants)."""
    creds = str(issue_etcd_creds(info, role, name)) if info.etcd_creds else ""
    etcd = {"etcd_endpoints": [info.etcd_endpoint], "etcd_creds": creds, "etcd_ca": info.etcd_ca}
    return _nats_link(info, role, name) | etcd


def _etcd_admin(info: ClusterInfo) -> etcd_auth.EtcdAdmin:
    return etcd_auth.EtcdAdmin(info.etcd_endpoint, credentials.read_etcd_login(info.etcd_creds), info.etcd_ca)


def operator_store(info: ClusterInfo) -> Store:
    """The cluster's etcd as its root (the operator's own tools and tests; never a service)."""
    login = credentials.read_etcd_login(info.etcd_creds) if info.etcd_creds else None
    return Store(
        info.all_etcd_endpoints(),
        login=login,
        ca=Path(info.etcd_ca).read_bytes() if info.etcd_ca else b"",
        client_cert=Path(info.etcd_client_cert).read_bytes() if info.etcd_client_cert else b"",
        server_name=info.etcd_server_name,
    )


def issue_etcd_creds(info: ClusterInfo, role: Role, name: str) -> Path:
    """The etcd login file of `name` in `role` (kept, 0600), its user and role asserted in etcd."""
    directory = secrets_dir(Path(info.state_dir)) / "etcd"
    return etcd_auth.issue(_etcd_admin(info), directory, role, name)


def _start_ebpf_services(
    info: ClusterInfo,
    verifiers: int,
    dpus: int,
    dpu_overrides: dict[str, Any],
    progress: Callable[[str], None],
) -> None:
    """Verifier replicas and DPU nodes load programs into the kernel: only as root."""
    if (verifiers or dpus) and os.geteuid() != 0:
        progress("not starting verifiers or DPU nodes: they load eBPF programs and need root")
        return
    for i in range(verifiers):
        progress(f"starting verifier-{i}")
        start_verifier(info, i)
    for i in range(1, dpus + 1):
        progress(f"starting dpu-{i}")
        start_dpu(info, i, dpu_overrides)


def start_etcd(info: ClusterInfo) -> int:
    """(Re)start the cluster's etcd on its ports and data directory: its data survives. In a
    secured cluster, with auth on and root's login kept in the state directory (made on the first
    start)."""
    host = info.etcd_endpoint.rsplit(":", 1)[0]
    state_dir = Path(info.state_dir)
    proc = services.start_etcd(
        info.etcd_client_port,
        info.etcd_peer_port,
        state_dir / "data" / "etcd",
        state_dir / "logs" / "etcd.log",
        host,
        _tls_files(info),
    )
    info.processes["etcd"] = proc.pid
    if info.nats_creds:
        path, _ = etcd_auth.load_or_create_login(secrets_dir(state_dir) / "etcd", etcd_auth.ROOT)
        info.etcd_creds = str(path)
        _etcd_admin(info).secure()
    write_cluster(info)
    return proc.pid


def start_scheduler(
    info: ClusterInfo, index: int, overrides: dict[str, Any], netns: str | None = None
) -> int:
    """Start replica `scheduler-<index>`; inside network namespace `netns` when given (as start_host)."""
    name = f"scheduler-{index}"
    settings = SchedulerSettings(
        scheduler_id=name,
        **_links(info, "scheduler", name),
        state_dir=info.state_dir,
        **overrides,
    )
    return _start_service(info, name, "scheduler", settings, _entering(netns))


def start_verifier(info: ClusterInfo, index: int, overrides: dict[str, Any] | None = None) -> int:
    """Verifier replicas of one cluster share its signing key (state dir `keys/`, mode 0600)."""
    name = f"verifier-{index}"
    settings = VerifierSettings(
        verifier_id=name,
        **_nats_link(info, "verifier", name),
        key_path=str(signing_key_path(info)),
        state_dir=info.state_dir,
        **(overrides or {}),
    )
    return _start_service(info, name, "verifier_service", settings)


def signing_key_path(info: ClusterInfo) -> Path:
    return Path(info.state_dir) / "keys" / "signing.pem"


def start_dpu(info: ClusterInfo, index: int, overrides: dict[str, Any] | None = None) -> int:
    """A DPU node trusts exactly the cluster's verifier key (created here if it does not exist yet)."""
    name = f"dpu-{index}"
    settings = DpuNodeSettings(
        node_id=name,
        **_links(info, "dpu", name),
        trusted_keys=[verifier_public_key(info)],
        state_dir=info.state_dir,
        **(overrides or {}),
    )
    return _start_service(info, name, "dpu_node", settings)


def verifier_public_key(info: ClusterInfo) -> str:
    """The cluster's verifier key, as nodes pin it (created here if it does not exist yet)."""
    return signing.public_key_text(load_or_create_key(signing_key_path(info)).public_key())


def host_ebpf(info: ClusterInfo, **limits: Any) -> EbpfRuntimeSettings:
    """A host node's `[ebpf]` settings: it takes eBPF functions placed "any" when no DPU has room."""
    return EbpfRuntimeSettings(trusted_keys=[verifier_public_key(info)], **limits)


def start_host(info: ClusterInfo, index: int, overrides: dict[str, Any], netns: str | None = None) -> int:
    """Start host node `host-<index>`; inside network namespace `netns` when given (a stand-in for
    another machine: it reaches NATS and etcd only over the network)."""
    name = f"host-{index}"
    work_dir = str(Path(info.state_dir) / "data" / name)
    overrides = {"sandbox": _sandbox_settings(info)} | overrides
    settings = HostNodeSettings(
        node_id=name,
        **_links(info, "host", name),
        work_dir=work_dir,
        state_dir=info.state_dir,
        **overrides,
    )
    return _start_service(info, name, "host_node", settings, _entering(netns))


def _entering(netns: str | None) -> list[str]:
    # nsenter, not `ip netns exec`: that one remounts /sys, which hides the host's cgroups
    return ["nsenter", f"--net=/run/netns/{netns}"] if netns else []


def _sandbox_settings(info: ClusterInfo) -> SandboxSettings:
    """Secure sandboxes when root can make them, plain processes otherwise; every cluster's cgroups
    under their own parent, so two local clusters (a demo and a test run) never share slots."""
    if os.geteuid() != 0:
        return SandboxSettings(mode="plain")
    return SandboxSettings(cgroup_parent=cgroup_parent(info))


def cgroup_parent(info: ClusterInfo) -> str:
    return "hetfaas-" + hashlib.sha256(str(Path(info.state_dir).resolve()).encode()).hexdigest()[:10]


def _start_service(
    info: ClusterInfo, name: str, module: str, settings: msgspec.Struct, prefix: list[str] | None = None
) -> int:
    config = Path(info.state_dir) / "config" / f"{name}.toml"
    if getattr(settings, "metrics_listen", None) == "":  # every local service gets a scrape endpoint
        settings = msgspec.structs.replace(settings, metrics_listen=f"127.0.0.1:{services.free_port()}")
    write_settings(settings, config)
    argv = [*(prefix or []), sys.executable, "-m", module, "--config", str(config)]
    proc = services.spawn(argv, Path(info.state_dir) / "logs" / f"{name}.log")
    info.processes[name] = proc.pid
    write_cluster(info)
    return proc.pid


def stop(
    info: ClusterInfo, timeout_s: float = 15.0, progress: Callable[[str], None] = lambda _: None
) -> list[str]:
    """SIGTERM our processes (services first, then etcd and nats), SIGKILL what outlives the timeout."""
    state_dir = Path(info.state_dir)
    order = sorted(info.processes, key=lambda name: name in ("nats", "etcd"))
    stopped = []
    for name in order:
        pid = info.processes[name]
        if is_ours(pid, state_dir):
            progress(f"stopping {name} (pid {pid})")
            terminate(pid, state_dir, timeout_s)
            stopped.append(name)
    info.processes = {}
    write_cluster(info)
    if os.geteuid() == 0:  # nodes remove their cgroups when they stop; a crashed one leaves them
        cgroups.remove_tree(cgroup_parent(info))
    return stopped


def terminate(pid: int, state_dir: Path, timeout_s: float) -> None:
    _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while is_ours(pid, state_dir) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.02)
    if is_ours(pid, state_dir):
        _signal(pid, signal.SIGKILL)
    _reap(pid)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    """Collect the exit status when the process is our own child (tests, or `up` in one process)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def kill(info: ClusterInfo, name: str, timeout_s: float = 5.0) -> None:
    """SIGKILL one process, a real unannounced failure (tests); returns once it has died."""
    pid = info.processes[name]
    state_dir = Path(info.state_dir)
    if is_ours(pid, state_dir):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while is_ours(pid, state_dir) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.005)
