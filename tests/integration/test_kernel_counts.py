"""What the kernel counts per user is counted per sandbox: one function exhausting its share leaves
its neighbours' and the host root's alone (host_node/sandbox/ids.py).

Each test holds a share from one function's warm instance (its globals keep the kernel objects
open between calls), then asks a second function, in another sandbox, and the host's root for
the same kind of object."""

import ctypes
import fcntl
import json
import os
from pathlib import Path

import pytest

from cli.client import Client
from host_node.sandbox.settings import SandboxSettings
from tests.integration.conftest import IDENTITY, host_pid, make_function

pytestmark = [pytest.mark.integration, pytest.mark.privileged]

F_GETPIPE_SZ = 1032

HOLDER = (
    IDENTITY
    + """
import ctypes, errno, fcntl, json, os

libc = ctypes.CDLL(None, use_errno=True)
held = []  # kept open across calls: this instance's share stays taken


def inotify(count):
    for _ in range(count):
        fd = libc.inotify_init1(os.O_CLOEXEC)
        if fd < 0:
            return errno.errorcode[ctypes.get_errno()]
        held.append(fd)
    return None


def big_pipes(count):
    for _ in range(count):
        read_end, write_end = os.pipe()
        held.extend((read_end, write_end))
        try:
            fcntl.fcntl(write_end, 1031, 1 << 20)  # F_SETPIPE_SZ: 256 pages, counted for our user
        except OSError as exc:
            return errno.errorcode[exc.errno]
    return None


def handle(payload):
    action, _, arg = payload.decode().partition(" ")
    if action == "inotify":
        failure = inotify(int(arg))
        return {"held": len(held), "failure": failure}
    if action == "big_pipes":
        failure = big_pipes(int(arg))
        return {"held": len(held) // 2, "failure": failure}
    if action == "pipe_size":
        read_end, write_end = os.pipe()
        size = fcntl.fcntl(write_end, 1032)  # F_GETPIPE_SZ
        os.close(read_end), os.close(write_end)
        return size
    if action == "release":
        while held:
            os.close(held.pop())
        return 0
    if action == "ids":
        return {"map": open("/proc/self/uid_map").read().split(), "identity": identity()}
    raise ValueError(action)
"""
)


@pytest.fixture(scope="module")
async def pair(client: Client, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tenant with two functions of the same code: `holder` and `neighbour`, two sandboxes."""
    if os.geteuid() != 0:
        pytest.skip("the secure sandbox needs root (plain processes run otherwise)")
    tenant = f"counts{os.getpid()}"
    manifest = 'runtime = "python"\nhandler = "holder:handle"\nmemory_mb = 256\ntimeout_ms = 5000\n'
    root = tmp_path_factory.mktemp("counts")
    for name in ("holder", "neighbour"):
        await client.deploy(make_function(root, name, manifest, {"holder.py": HOLDER}), tenant=tenant)
    return tenant


def read(path: str) -> str:
    return Path(path).read_text()


async def ask(client: Client, tenant: str, function: str, action: str):
    outcome = await client.invoke(tenant, function, action.encode(), timeout_ms=20_000)
    assert outcome.ok, outcome.error
    return json.loads(outcome.reply.output)


@pytest.fixture
async def released(client: Client, pair: str):
    yield
    for function in ("holder", "neighbour"):
        await ask(client, pair, function, "release")


async def test_every_sandbox_has_a_host_uid_of_its_own(client: Client, pair: str) -> None:
    maps = [await ask(client, pair, function, "ids") for function in ("holder", "neighbour")]
    host_uids = []
    for seen in maps:
        host_status = read(f"/proc/{host_pid(seen['identity'])}/status")
        uid = next(line.split()[1] for line in host_status.splitlines() if line.startswith("Uid:"))
        root_line, function_line = seen["map"][:3], seen["map"][3:]
        assert root_line[0] == "0" and root_line[2] == "1", "namespace root is one host id, not root"
        assert function_line == ["65534", uid, "1"], "the function's uid maps to its own host uid"
        host_uids.append(int(uid))

    assert host_uids[0] != host_uids[1], "two live sandboxes never share a host uid"
    assert all(uid >= SandboxSettings().sandbox_uid_base for uid in host_uids)


async def test_one_sandbox_exhausting_inotify_leaves_its_neighbour_and_the_host_theirs(
    client: Client, pair: str, released: None
) -> None:
    share = SandboxSettings().inotify_instances
    hog = await ask(client, pair, "holder", f"inotify {share + 72}")
    neighbour = await ask(client, pair, "neighbour", "inotify 10")
    libc = ctypes.CDLL(None, use_errno=True)
    host_fd = libc.inotify_init1(os.O_CLOEXEC)
    host_errno = ctypes.get_errno()
    if host_fd >= 0:
        os.close(host_fd)
    again = await ask(client, pair, "holder", "inotify 0")

    assert hog == {"held": share, "failure": "EMFILE"}, "a sandbox gets its own share, and no more"
    assert neighbour == {"held": 10, "failure": None}, "another sandbox still gets instances"
    assert host_fd >= 0, f"the host's root got {os.strerror(host_errno)} while a sandbox held its share"
    assert again["held"] == share, "the hog's instances are still held: the others did not wait it out"


async def test_one_sandbox_taking_every_pipe_page_leaves_its_neighbour_full_size_pipes(
    client: Client, pair: str, released: None
) -> None:
    soft_pages = int(read("/proc/sys/fs/pipe-user-pages-soft"))
    if soft_pages == 0:
        pytest.skip("this host sets no per-user pipe limit (fs.pipe-user-pages-soft = 0)")
    read_end, write_end = os.pipe()
    default_size = fcntl.fcntl(write_end, F_GETPIPE_SZ)
    os.close(read_end), os.close(write_end)
    pipes_to_fill = soft_pages // 256 + 8  # 1 MiB pipes: 256 pages each, past the soft limit

    hog = await ask(client, pair, "holder", f"big_pipes {pipes_to_fill}")
    neighbour_size = await ask(client, pair, "neighbour", "pipe_size")

    assert hog["failure"] == "EPERM", "the hog reached its user's pipe limit"
    assert neighbour_size == default_size, "a neighbour's new pipes are not cut to the minimum"
