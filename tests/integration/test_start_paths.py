"""Every way a python instance starts gives the same sandbox: a fresh start (sandbox, then the
interpreter) and a stem cell (an interpreter already waiting in its sandbox, given the function
later) each pass the isolation checks of test_sandbox.py, with the function's own limits."""

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from host_node.runtimes.errors import FunctionFailed
from host_node.runtimes.python import PythonInstance
from host_node.runtimes.python_stem import StemCell, StemLost
from host_node.sandbox import cgroups
from host_node.sandbox.agent import ShardedSpawner
from host_node.sandbox.pool import PoolSettings
from host_node.sandbox.settings import SandboxSettings
from host_node.stem_cells import StemCells
from schemas.messages import FunctionSpec, NodeInvoke
from tests.integration.conftest import host_pid, wait_gone
from tests.integration.test_sandbox import HOST_WIDE, PROBE

pytestmark = pytest.mark.privileged

SETTINGS = SandboxSettings(
    mode="prewarm",
    shards=1,
    cgroup_parent=f"hetfaas-starttest-{os.getpid()}",
    pool=PoolSettings(low_water=2, target=4),
)
FUNCTION_MB = 256  # not the idle size class (128 MB) a stem cell waits in
PATHS = ("fresh", "stem_cell")


@pytest.fixture(scope="module")
async def spawner(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ShardedSpawner]:
    if os.geteuid() != 0:
        pytest.skip("the secure sandbox needs root (cgroups, namespaces)")
    spawner = ShardedSpawner(SETTINGS, "starttest", tmp_path_factory.mktemp("starts"))
    await spawner.open()
    yield spawner
    await spawner.close()
    spawner.remove_all_slots()
    cgroups.remove_tree(SETTINGS.cgroup_parent)


@pytest.fixture(scope="module")
def code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("probe-code")
    (directory / "probe.py").write_text(PROBE)
    (directory / "broken.py").write_text("raise RuntimeError('this module does not import')\n")
    directory.chmod(0o755)
    return directory


async def start(spawner: ShardedSpawner, path: str, code: Path, log: Path, handler: str = "probe:handle"):
    limits = SETTINGS.limits_for(FUNCTION_MB)
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        if path == "fresh":
            return await PythonInstance.start(spawner, handler, code, log_fd, 1 << 20, 20.0, limits, {})
        stem = await StemCell.start(spawner, SETTINGS.limits_for(SETTINGS.idle_memory_mb), 20.0)
        return await stem.become(spawner, handler, code, None, log_fd, 1 << 20, 20.0, limits, {})
    finally:
        os.close(log_fd)


@pytest.fixture(params=PATHS)
async def instance(
    request, spawner: ShardedSpawner, code: Path, tmp_path: Path
) -> AsyncIterator[PythonInstance]:
    started = await start(spawner, request.param, code, tmp_path / "function.log")
    yield started
    started.kill()


def invocation(payload: bytes) -> NodeInvoke:
    spec = FunctionSpec(
        name="probe", runtime="python", tenant="starts", handler="probe:handle", memory_mb=FUNCTION_MB
    )
    return NodeInvoke(
        invocation_id="i1", spec=spec, bundle_digest="sha256-" + "0" * 64, payload=payload, timeout_ms=20_000
    )


async def ask(instance: PythonInstance, action: str):
    return json.loads(await instance.invoke(invocation(action.encode()), 20.0))


def host_limit(pid: int, controller: str, v2_file: str, v1_file: str) -> str:
    """A limit of the cgroup the host pid runs in, as the host sees it (cgroup v2 or v1)."""
    mounts = cgroups.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            root = next(m for m, kind, options in mounts if kind == "cgroup" and controller in options)
            return Path(root + path, v1_file).read_text().strip()
    v2_path = next(
        line.split("::", 1)[1]
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        if line.startswith("0::")
    )
    root = next(m for m, kind, _ in mounts if kind == "cgroup2")
    return Path(root + v2_path, v2_file).read_text().strip()


async def test_every_path_runs_unprivileged_alone_and_cut_off(instance: PythonInstance) -> None:
    status = await ask(instance, "status")
    assert status["Uid"].split() == ["65534"] * 4
    assert all(int(status[s], 16) == 0 for s in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")), status
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert await ask(instance, "processes") == [1]
    writes = await ask(instance, "writes")
    assert writes.pop("/tmp/x") is None and set(writes.values()) <= {"EROFS", "EACCES", "ENOENT"}, writes
    network = await ask(instance, "network 4222")
    assert network["interfaces"] == ["lo"] and network["outside"] == "ENETUNREACH"
    privileged = await ask(instance, "privileged")
    assert all(privileged.values()), privileged
    shown = await ask(instance, "proc")
    assert all(shown[name] == "ENOENT" for name in HOST_WIDE), shown


async def test_every_path_has_the_functions_own_limits(instance: PythonInstance) -> None:
    pid = host_pid((await instance.invoke(invocation(b"identity"), 20.0)).decode())
    limits = SETTINGS.limits_for(FUNCTION_MB)
    assert int(host_limit(pid, "memory", "memory.max", "memory.limit_in_bytes")) == limits.memory_mb << 20
    assert host_limit(pid, "pids", "pids.max", "pids.max") == str(limits.pids_max)
    bomb = await ask(instance, "fork_bomb")
    assert bomb["failure"] == "EAGAIN" and bomb["forks"] < limits.pids_max, bomb


async def test_every_path_is_oom_killed_at_the_functions_memory(instance: PythonInstance) -> None:
    with pytest.raises(FunctionFailed) as failed:
        await instance.invoke(invocation(f"hog {FUNCTION_MB + 64}".encode()), 20.0)
    assert "out of memory" in failed.value.message, failed.value


@pytest.mark.parametrize("path", PATHS)
async def test_a_handler_that_fails_to_import_fails_alike(
    spawner, code: Path, tmp_path: Path, path: str
) -> None:
    with pytest.raises(FunctionFailed) as failed:
        await start(spawner, path, code, tmp_path / "log", handler="broken:handle")
    assert failed.value.code == "function_error" and "this module does not import" in (
        failed.value.detail or ""
    )


async def test_a_stem_cells_output_goes_to_its_functions_log(spawner, tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir(mode=0o755)
    talk = (
        "import sys\n"
        "print('imported', flush=True)\n"
        "def handle(p):\n"
        "    print('said', p.decode(), file=sys.stderr, flush=True)\n"
        "    return p\n"
    )
    (code / "talk.py").write_text(talk)
    log = tmp_path / "function.log"
    instance = await start(spawner, "stem_cell", code, log, handler="talk:handle")
    try:
        assert await instance.invoke(invocation(b"hello"), 20.0) == b"hello"
    finally:
        instance.kill()
    assert log.read_text().split("\n")[:2] == ["imported", "said hello"]


async def test_a_dead_stem_cell_is_passed_over(spawner) -> None:
    stems = StemCells(spawner, SETTINGS.limits_for(SETTINGS.idle_memory_mb), target=0)
    stem = await StemCell.start(spawner, SETTINGS.limits_for(SETTINGS.idle_memory_mb), 20.0)
    stems._idle.append(stem)
    stem.proc.kill()
    await stem.proc.exited
    assert stems.take() is None, "a stem cell that died idle is not handed out"


async def test_a_stem_cell_lost_before_it_takes_its_function_says_so(
    spawner, code: Path, tmp_path: Path
) -> None:
    stem = await StemCell.start(spawner, SETTINGS.limits_for(SETTINGS.idle_memory_mb), 20.0)
    pid = stem.proc.pid
    stem.proc.kill()
    assert await wait_gone(pid)
    await stem.proc.exited
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        with pytest.raises(StemLost):
            await stem.become(
                spawner, "probe:handle", code, None, null, 1 << 20, 5.0, SETTINGS.limits_for(FUNCTION_MB), {}
            )
    finally:
        os.close(null)
