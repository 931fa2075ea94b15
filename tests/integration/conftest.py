"""Real clusters for integration tests: nats-server, etcd, scheduler(s) and host nodes, each its
own process on free loopback ports, in a temporary state directory."""

import asyncio
import itertools
import os
import time
import tomllib
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.client import Client
from deploy import launcher
from fabric import bus
from fabric.connection import Connection
from host_node.sandbox import cgroups
from schemas import codec, subjects

pytestmark = pytest.mark.integration

# Fast failure detection so the failure tests finish in seconds.
HOST_OVERRIDES = {
    "lease_ttl_s": 2,
    "heartbeat_interval_s": 0.2,
    "keep_alive_s": 30.0,
    "max_output_bytes": 1 << 20,
}
SCHEDULER_OVERRIDES = {
    "lease_ttl_s": 2,
    "node_stale_after_s": 1.0,
    "max_payload_bytes": 64 * 1024,
    "max_layer_bytes": 4 * 1024 * 1024,  # test_dependencies goes past it with a 5 MiB wheel
    # queue up to the caller's deadline: while a killed node is being declared lost, the
    # invocations it held keep their share of the function's limit for a second or two
    "admission": {"max_queue_wait_ms": 10_000},
}
_tenants = itertools.count()


def start_cluster(state_dir: Path, hosts: int = 2, schedulers: int = 1) -> launcher.ClusterInfo:
    os.environ.setdefault("OTEL_BSP_SCHEDULE_DELAY", "100")  # flush spans quickly for the tracing test
    return launcher.up(
        state_dir,
        hosts=hosts,
        schedulers=schedulers,
        host_overrides=HOST_OVERRIDES,
        scheduler_overrides=SCHEDULER_OVERRIDES,
    )


async def wait_for_nodes(info: launcher.ClusterInfo, nodes: int) -> None:
    client = await Client.connect(info.nats_url, "tests-setup", creds=info.nats_creds, ca=info.nats_ca)
    try:
        await client.wait_until_ready(nodes, timeout_s=30)
    finally:
        await client.close()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[launcher.ClusterInfo]:
    """The shared cluster (2 hosts, 1 scheduler), ready: both nodes registered and heartbeating."""
    info = start_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        asyncio.run(wait_for_nodes(info, 2))
        yield info
    finally:
        launcher.stop(info)


@pytest.fixture(scope="session")
async def client(cluster: launcher.ClusterInfo) -> AsyncIterator[Client]:
    client = await Client.connect(cluster.nats_url, "tests", creds=cluster.nats_creds)
    yield client
    await client.close()


@pytest.fixture(scope="session")
async def harness(cluster: launcher.ClusterInfo) -> AsyncIterator[Connection]:
    """A raw connection allowed everything: for tests that play a node, a scheduler or a buggy
    client with malformed messages (what the services make of them is what they test)."""
    nc = await bus.connect(cluster.nats_url, "test-harness", creds=harness_creds(cluster))
    yield nc
    await bus.close(nc)


def harness_creds(cluster: launcher.ClusterInfo) -> str:
    """Credentials allowed everything (see `harness`)."""
    path = launcher.unrestricted_creds(cluster, "test-harness")
    assert path is not None, "the test cluster is secured"
    return path


async def raw_request(nc: Connection, subject: str, data: bytes, timeout_s: float = 5) -> Any:
    """A request as a raw client sends it, its reply decoded. A tenant's subject gets a reply
    subject in that tenant's inbox (services answer no other)."""
    parts = subject.split(".")
    tenant = parts[2] if len(parts) > 2 and parts[1] in ("invoke", "control", "verify") else ""
    inbox = f"{subjects.tenant_inbox(tenant)}.{os.urandom(6).hex()}" if tenant else nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, data, reply=inbox)
    try:
        msg = await sub.next_msg(timeout=timeout_s)
    finally:
        await sub.unsubscribe()
    return codec.invoke_result.decode(msg.data)


@pytest.fixture
def tenant() -> str:
    """A fresh tenant per test, so tests never see each other's functions or warm instances."""
    return f"t{os.getpid()}x{next(_tenants)}"


def make_function(root: Path, name: str, manifest: str, files: dict[str, str]) -> Path:
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "function.toml").write_text(f'name = "{name}"\n' + manifest)
    for filename, text in files.items():
        path = directory / filename
        path.write_text(text)
        if text.startswith("#!"):
            path.chmod(0o755)
    return directory


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def process_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# Function code that names its own process in a way the host can find: the cgroup it runs in and
# its start time (a sandboxed function is pid 1 in its own pid namespace, so its pid says nothing).
IDENTITY = """
def identity():
    fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
    cgroup = [l for l in open("/proc/self/cgroup").read().splitlines() if l.startswith("0::")][0][3:]
    return cgroup + " " + fields[19]
"""


def _identity_of(pid: str) -> str | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    cgroup = next((line[3:] for line in lines if line.startswith("0::")), "")
    return f"{cgroup} {fields[19]}"


def host_pid(identity: str) -> int:
    """The host pid of the process whose IDENTITY() returned `identity`."""
    pids = pids_of(identity)
    assert len(pids) == 1, f"{len(pids)} processes match {identity!r}"
    return pids[0]


def pids_of(identity: str) -> list[int]:
    """Host pids of live processes whose IDENTITY() returned `identity` (none once it exited)."""
    return [
        int(p)
        for p in os.listdir("/proc")
        if p.isdigit() and _identity_of(p) == identity and not process_gone(int(p))
    ]


def pids_running(marker: str) -> list[int]:
    """Host processes whose command line contains `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes() and not process_gone(int(pid)):
                found.append(int(pid))
        except OSError:
            pass
    return found


async def wait_until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def wait_gone(pid: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not process_gone(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def cgroup_dirs_named(name: str) -> list[str]:
    """The cgroup hierarchies holding a top-level cgroup `name`."""
    mounts = [p for p, _, _ in cgroups.parse_mountinfo(Path("/proc/self/mountinfo").read_text())]
    return [m for m in mounts if os.path.exists(os.path.join(m, name))]


def rss_mb(pid: int) -> float:
    """A process's resident memory, MB (for tests that show a flood leaves it bounded)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of (start, end) intervals that overlap at one moment: how many
    invocations of a function really ran at once, from the times the function itself reported."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in edges:  # at equal times an end sorts before a start: touching is not overlapping
        running += step
        peak = max(peak, running)
    return peak


def scrape(state_dir: str | Path, service: str) -> str:
    """The service's Prometheus endpoint, as the launcher configured it."""
    settings = tomllib.loads((Path(state_dir) / "config" / f"{service}.toml").read_text())
    with urllib.request.urlopen(f"http://{settings['metrics_listen']}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return response.read().decode()


def metric_value(text: str, prefix: str) -> float:
    """The sum of the samples whose line starts with `prefix` (a name and some of its labels)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))
