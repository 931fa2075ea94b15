"""Isolation, each property checked from inside a deployed function running in its sandbox."""

import asyncio
import json
import os
from pathlib import Path
from urllib.parse import urlparse

import pytest

from cli.client import Client
from tests.integration.conftest import IDENTITY, host_pid, make_function, pids_running, wait_gone, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.privileged]

REPO = str(Path(__file__).resolve().parents[2])  # where the node's runtimes and hetfaas-waiter live
# What /proc holds of the whole host rather than of the sandbox.
HOST_WIDE = (
    "stat",
    "meminfo",
    "loadavg",
    "pressure/cpu",
    "interrupts",
    "softirqs",
    "vmstat",
    "diskstats",
    "schedstat",
    "config.gz",
    "cmdline",
    "uptime",
    "sys/kernel/hostname",
    "keys",
    "timer_list",
    "kcore",
)

PROBE = (
    IDENTITY
    + f"HOST_WIDE = {HOST_WIDE!r}\n"
    + '''
import ctypes, errno, json, os, socket, time

libc = ctypes.CDLL(None, use_errno=True)


def attempt(call):
    """None when the call worked, else the errno name it failed with."""
    try:
        result = call()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    if isinstance(result, int) and result < 0:
        return errno.errorcode[ctypes.get_errno()]
    return None


def write(path):
    with open(path, "w") as f:
        f.write("x")


def fork_bomb():
    read_end, write_end = os.pipe()
    children, failure = [], None
    while failure is None and len(children) < 10_000:
        try:
            pid = os.fork()
        except OSError as exc:
            failure = errno.errorcode[exc.errno]
            break
        if pid == 0:
            os.close(write_end)
            os.read(read_end, 1)  # parked until the parent lets go
            os._exit(0)
        children.append(pid)
    os.close(write_end)
    for pid in children:
        os.waitpid(pid, 0)
    return {"forks": len(children), "failure": failure}


def hog(megabytes):
    chunks = [bytearray(1 << 20) for _ in range(megabytes)]
    return len(chunks)


def escape_and_hang(marker):
    """Double fork into a new session (out of any process group) running a marked sleeper, then hang."""
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv("/usr/bin/python3", ["python3", "-c", "import time; time.sleep(3600)", marker])
        os._exit(0)
    time.sleep(3600)


def handle(payload):
    action, _, arg = payload.decode().partition(" ")
    if action == "identity":
        return identity()
    if action == "status":
        lines = open("/proc/self/status").read().splitlines()
        keep = ("Uid", "Gid", "Cap", "NoNewPrivs", "Seccomp")
        return dict(line.split(":\\t", 1) for line in lines if line.startswith(keep))
    if action == "uid_map":
        return {"map": open("/proc/self/uid_map").read().split(), "identity": identity()}
    if action == "writes":
        paths = ["/x", "/code/x", "/usr/x", "/etc/x", "/proc/sys/kernel/hostname", "/tmp/x"]
        return {p: attempt(lambda p=p: write(p)) for p in paths}
    if action == "tmpdir":  # where tempfile puts a scratch file (a forked instance's own $TMPDIR)
        import tempfile
        where = tempfile.gettempdir()
        return {"dir": where, "write": attempt(lambda: write(where + "/y"))}
    if action == "processes":
        return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    if action == "network":
        port = int(arg)
        return {
            "interfaces": [name for _, name in socket.if_nameindex()],
            "host_nats": attempt(lambda: socket.create_connection(("127.0.0.1", port), timeout=1)),
            "outside": attempt(lambda: socket.create_connection(("10.255.255.1", 9), timeout=1)),
            "loopback": attempt(lambda: socket.socket().bind(("127.0.0.1", 0))),
        }
    if action == "privileged":
        return {
            "mount": attempt(lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
            "ptrace": attempt(lambda: libc.ptrace(16, 1, 0, 0)),  # PTRACE_ATTACH to our init
            "raw_socket": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)),
            "packet_socket": attempt(lambda: socket.socket(17, socket.SOCK_RAW, 0)),
            "vsock": attempt(lambda: socket.socket(40, socket.SOCK_STREAM, 0)),
            "netlink_uevent": attempt(lambda: socket.socket(16, socket.SOCK_DGRAM, 15)),
            "crypto_api": attempt(lambda: socket.socket(38, 5, 0)),
            "unshare_user": attempt(lambda: libc.unshare(0x10000000)),
            "bpf": attempt(lambda: libc.syscall(321, 0, 0, 0)),
            "chroot": attempt(lambda: libc.chroot(b"/tmp")),
            "setuid_root": attempt(lambda: os.setuid(0)),
        }
    if action == "proc":
        shown = {}
        for name in HOST_WIDE:
            shown[name] = attempt(lambda name=name: open("/proc/" + name, "rb").read()) or "read"
        shown["self"] = len(open("/proc/self/status").read())
        shown["cpus"] = os.cpu_count()
        shown["mount_roots"] = [line.split()[3] for line in open("/proc/self/mountinfo")]
        return shown
    if action == "x32":
        libc.syscall(39 | 0x40000000)  # getpid through the x32 ABI
        return "survived"
    if action == "fork_bomb":
        return fork_bomb()
    if action == "hog":
        return hog(int(arg))
    if action == "escape_and_hang":
        escape_and_hang(arg)
    return "fine"
'''
)


@pytest.fixture(scope="module")
async def probe(client: Client, tmp_path_factory: pytest.TempPathFactory) -> str:
    if os.geteuid() != 0:
        pytest.skip("the secure sandbox needs root (plain processes run otherwise)")
    tenant = f"sandbox{os.getpid()}"
    manifest = (
        'runtime = "python"\nhandler = "probe:handle"\nmemory_mb = 512\ntimeout_ms = 3000\nconcurrency = 4\n'
    )
    await client.deploy(
        make_function(tmp_path_factory.mktemp("probe"), "probe", manifest, {"probe.py": PROBE}), tenant=tenant
    )
    return tenant


def read(path: str) -> str:
    return Path(path).read_text()


async def ask(client: Client, tenant: str, action: str):
    outcome = await client.invoke(tenant, "probe", action.encode(), timeout_ms=20_000)
    assert outcome.ok, outcome.error
    return json.loads(outcome.reply.output)


async def test_functions_run_unprivileged_with_no_capabilities(client: Client, probe: str) -> None:
    status = await ask(client, probe, "status")

    assert status["Uid"].split() == ["65534"] * 4 and status["Gid"].split() == ["65534"] * 4
    for capability_set in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[capability_set], 16) == 0, capability_set
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"


async def test_functions_run_in_a_user_namespace_of_their_own(client: Client, probe: str) -> None:
    if read("/proc/sys/user/max_user_namespaces").strip() == "0":
        pytest.skip("this kernel allows no user namespaces")  # the sandbox then runs without one
    inside = await ask(client, probe, "uid_map")
    host_status = read(f"/proc/{host_pid(inside['identity'])}/status")
    host_uid = next(line.split()[1] for line in host_status.splitlines() if line.startswith("Uid:"))

    root, function = inside["map"][:3], inside["map"][3:]
    assert len(inside["map"]) == 6, "two ids exist in the sandbox: its root and the function's"
    assert root[0] == "0" and int(root[1]) >= 100000 and root[2] == "1", "its root is no host root"
    assert function == ["65534", host_uid, "1"], "the function is the sandbox's own host uid"
    assert int(host_uid) > int(root[1]), "on the host the function is an unused uid, not nobody"


async def test_only_tmp_is_writable(client: Client, probe: str) -> None:
    results = await ask(client, probe, "writes")

    assert results.pop("/tmp/x") is None
    assert set(results.values()) <= {"EROFS", "EACCES", "ENOENT"}, results


async def test_host_processes_are_invisible(client: Client, probe: str) -> None:
    assert await ask(client, probe, "processes") == [1], "the function is its pid namespace's only process"


async def test_no_network_beyond_its_own_loopback(client: Client, probe: str, cluster) -> None:
    nats_port = urlparse(cluster.nats_url).port
    results = await ask(client, probe, f"network {nats_port}")

    assert results["interfaces"] == ["lo"]
    assert results["host_nats"] == "ECONNREFUSED", "the host's loopback is not the sandbox's"
    assert results["outside"] == "ENETUNREACH"
    assert results["loopback"] is None


async def test_mount_ptrace_raw_sockets_and_namespaces_are_denied(client: Client, probe: str) -> None:
    results = await ask(client, probe, "privileged")

    assert all(results.values()), f"every call must fail: {results}"
    sockets = ("raw_socket", "packet_socket", "vsock", "netlink_uevent", "crypto_api")
    assert {results[name] for name in sockets} == {"EPERM"}, results


async def test_proc_hides_what_is_the_hosts(client: Client, probe: str) -> None:
    """Host-wide /proc files are absent, the sandbox's own work, and no mount names a host path
    of the node's install or state (the function's code is the one mount of the node's)."""
    shown = await ask(client, probe, "proc")
    for name in HOST_WIDE:
        assert shown[name] == "ENOENT", (name, shown[name])
    assert shown["self"] > 0 and shown["cpus"] == len(os.sched_getaffinity(0))
    assert not [root for root in shown["mount_roots"] if root.startswith(REPO)], shown["mount_roots"]
    assert read("/proc/loadavg"), "the host's own /proc is untouched"


async def test_a_foreign_syscall_abi_kills_the_function(client: Client, probe: str) -> None:
    """x32's numbers (0x40000000 and up) would dodge every number the filter checks."""
    outcome = await client.invoke(probe, "probe", b"x32", timeout_ms=20_000)
    assert outcome.error is not None and outcome.error.code == "function_error", outcome
    assert "SIGSYS" in outcome.error.message or "signal 31" in outcome.error.message, outcome.error
    assert "Seccomp" in await ask(client, probe, "status"), "the next call gets a fresh instance"


async def test_a_fork_bomb_is_stopped_by_the_pids_limit(client: Client, probe: str) -> None:
    bomb = await ask(client, probe, "fork_bomb")
    after = await client.invoke(probe, "probe", b"ok")

    assert bomb["failure"] == "EAGAIN" and bomb["forks"] < 256, bomb
    assert after.ok and after.reply.output == b"fine", "the node and the instance carry on"


async def test_a_memory_hog_is_oom_killed_inside_its_sandbox_only(
    client: Client, probe: str, tmp_path: Path
) -> None:
    neighbour = probe + "n"
    manifest = 'runtime = "python"\nhandler = "probe:handle"\n'
    await client.deploy(make_function(tmp_path, "probe", manifest, {"probe.py": PROBE}), tenant=neighbour)
    bystander = await client.invoke(neighbour, "probe", b"identity")
    hog = await client.invoke(probe, "probe", b"hog 2048", timeout_ms=20_000)
    after = await client.invoke(probe, "probe", b"ok")

    assert hog.error and hog.error.code == "function_error" and "out of memory" in hog.error.message, (
        hog.error
    )
    assert after.ok
    assert not await wait_gone(host_pid(bystander.reply.output.decode()), timeout_s=0.2), (
        "another tenant's instance lives on"
    )


async def test_a_timed_out_function_leaves_no_process_behind(client: Client, probe: str) -> None:
    marker = f"hetfaas-escapee-{probe}"
    invocation = asyncio.create_task(client.invoke(probe, "probe", f"escape_and_hang {marker}".encode()))
    escaped = await wait_until(lambda: bool(pids_running(marker)))
    hung = await invocation

    assert escaped, "the function started a grandchild in a session of its own"
    assert hung.error and hung.error.code == "timeout"
    assert await wait_until(lambda: not pids_running(marker)), "the sandbox died whole, escapee included"
