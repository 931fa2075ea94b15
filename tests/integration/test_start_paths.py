"""Every way a python instance starts gives the sandbox's isolation: a fresh start (sandbox, then
the interpreter), a stem cell (an interpreter already waiting in its sandbox, given the function
later) and a fork of the function's template (its imports done) each pass the isolation checks of
test_sandbox.py, with the function's own limits; forks are fenced off from each other and from
their template."""

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from host_node.runtimes import protocol
from host_node.runtimes.errors import FunctionFailed
from host_node.runtimes.python import FunctionCode, PythonInstance
from host_node.runtimes.python_stem import StemCell, StemLost
from host_node.runtimes.python_template import Template
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
PATHS = ("fresh", "stem_cell", "template_fork")


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
        if path == "template_fork":
            template = await Template.start(
                spawner, handler, FunctionCode(code), log_fd, 1 << 20, 20.0, limits
            )
            instance = await template.fork(spawner, 20.0, {})
            instance.template = template  # type: ignore[attr-defined]  # stopped with it (teardown)
            return instance
        stem = await StemCell.start(spawner, SETTINGS.limits_for(SETTINGS.idle_memory_mb), 20.0)
        return await stem.become(spawner, handler, code, None, log_fd, 1 << 20, 20.0, limits, {})
    finally:
        os.close(log_fd)


def stop(instance: PythonInstance) -> None:
    instance.kill()
    if (template := getattr(instance, "template", None)) is not None:
        template.kill()


@pytest.fixture(params=PATHS)
async def instance(
    request, spawner: ShardedSpawner, code: Path, tmp_path: Path
) -> AsyncIterator[PythonInstance]:
    started = await start(spawner, request.param, code, tmp_path / "function.log")
    started.path = request.param  # type: ignore[attr-defined]
    yield started
    stop(started)


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
    processes, writes, tmpdir = (
        await ask(instance, "processes"),
        await ask(instance, "writes"),
        await ask(instance, "tmpdir"),
    )
    tmp_write = writes.pop("/tmp/x")
    assert set(writes.values()) <= {"EROFS", "EACCES", "ENOENT"}, writes
    assert tmpdir["write"] is None, tmpdir
    if instance.path == "template_fork":  # type: ignore[attr-defined]
        # its template's pid namespace: the template is its pid 1; its scratch is its own directory
        assert len(processes) == 2 and processes[0] == 1, processes
        assert tmp_write == "EACCES" and tmpdir["dir"].startswith("/tmp/f"), (tmp_write, tmpdir)
    else:
        assert processes == [1] and tmp_write is None and tmpdir["dir"] == "/tmp", (processes, tmp_write)
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
        stop(instance)
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


SIBLINGS = """
import ctypes, errno, os, signal, socket, tempfile

libc = ctypes.CDLL(None, use_errno=True)
STATE = {"count": 0}
KEPT = []


def attempt(call):
    try:
        result = call()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    if isinstance(result, int) and result < 0:
        return errno.errorcode[ctypes.get_errno()]
    return None


def listen_abstract(name):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("\\0" + name)
    server.listen()
    KEPT.append(server)


def handle(payload):
    return {"result": act(payload)}


def act(payload):
    action, _, arg = payload.decode().partition(" ")
    if action == "who":
        return {"pid": os.getpid(), "tmp": tempfile.gettempdir()}
    if action == "count":
        STATE["count"] += 1
        return STATE["count"]
    if action == "plant":
        with open(os.path.join(tempfile.gettempdir(), "secret"), "w") as f:
            f.write("mine")
        return "planted"
    if action == "read":
        return attempt(lambda: open(arg).read())
    if action == "list":
        return attempt(lambda: os.listdir(arg))
    if action == "signal":
        return attempt(lambda: os.kill(int(arg), signal.SIGUSR1 if arg != str(os.getpid()) else 0))
    if action == "environ":
        return attempt(lambda: open(f"/proc/{arg}/environ", "rb").read())
    if action == "ipc":
        return {
            "shm": attempt(lambda: libc.syscall(29, 0, 4096, 0o1600)),
            "msg": attempt(lambda: libc.syscall(68, 0, 0o1600)),
            "udp": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)),
            "tcp_bind": attempt(lambda: socket.socket().bind(("127.0.0.1", 0))),
            "tcp_client": attempt(lambda: socket.socket().close()),
        }
    if action == "listen":
        return attempt(lambda: listen_abstract(arg))
    if action == "connect":
        return attempt(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect("\\0" + arg))
    return "?"
"""


async def test_forks_of_one_template_are_fenced_off_from_each_other_and_from_it(
    spawner: ShardedSpawner, tmp_path: Path
) -> None:
    """Memory, files under /tmp, signals, /proc of the other, System V IPC and UDP, TCP ports,
    abstract unix sockets: nothing one fork does reaches its sibling or its template."""
    code = tmp_path / "code"
    code.mkdir(mode=0o755)
    (code / "siblings.py").write_text(SIBLINGS)
    log = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o644)
    template = await Template.start(
        spawner, "siblings:handle", FunctionCode(code), log, 1 << 20, 20.0, SETTINGS.limits_for(FUNCTION_MB)
    )
    os.close(log)
    first, second = await template.fork(spawner, 20.0, {}), await template.fork(spawner, 20.0, {})

    async def ask(instance: PythonInstance, action: str):
        return json.loads(await instance.invoke(invocation(action.encode()), 20.0))["result"]

    try:
        me, sibling = await ask(first, "who"), await ask(second, "who")
        assert [await ask(first, "count"), await ask(first, "count"), await ask(second, "count")] == [1, 2, 1]
        assert await ask(first, "plant") == "planted" and await ask(first, f"read {me['tmp']}/secret") is None
        assert await ask(second, f"read {me['tmp']}/secret") == "EACCES", (
            "a sibling's /tmp is not its to read"
        )
        assert (
            await ask(second, "list /tmp") == "EACCES" and await ask(second, f"list {me['tmp']}") == "EACCES"
        )
        assert await ask(first, f"signal {me['pid']}") is None, "it may signal itself"
        for target in (sibling["pid"], 1):  # its sibling, and its template (pid 1 of their namespace)
            assert await ask(first, f"signal {target}") == "EPERM", target
            assert await ask(first, f"environ {target}") in ("EACCES", "EPERM"), target
        ipc = await ask(first, "ipc")
        assert ipc == {
            "shm": "EPERM",
            "msg": "EPERM",
            "udp": "EPERM",
            "tcp_bind": "EACCES",
            "tcp_client": None,
        }, ipc
        assert await ask(first, "listen hetfaas-fork-test") is None
        assert await ask(second, "connect hetfaas-fork-test") == "EPERM", (
            "a sibling's abstract socket is fenced"
        )
        assert await ask(second, "count") == 2, "after all of it, the sibling serves on"
    finally:
        for instance in (first, second):
            instance.kill()
        template.kill()


def cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


async def test_a_forks_cgroup_is_its_own_and_not_its_templates(
    spawner: ShardedSpawner, code: Path, tmp_path: Path
) -> None:
    instance = await start(spawner, "template_fork", code, tmp_path / "log")
    try:
        fork_pid = host_pid((await instance.invoke(invocation(b"identity"), 20.0)).decode())
        template_pid = instance.template.proc.pid  # type: ignore[attr-defined]
        assert cgroup_of(fork_pid) != cgroup_of(template_pid), "moved out of its template's slot"
    finally:
        stop(instance)


async def test_a_fork_asked_for_right_after_another_ended_is_made(
    spawner: ShardedSpawner, code: Path, tmp_path: Path
) -> None:
    """The template's socket is a stream: a FORK_ENDED and the next FORK can arrive in one read
    (here: both sent while the template is stopped). Both are served; before, the FORK was lost
    and the start waited out its deadline."""
    log = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o644)
    limits = SETTINGS.limits_for(FUNCTION_MB)
    template = await Template.start(spawner, "probe:handle", FunctionCode(code), log, 1 << 20, 20.0, limits)
    os.close(log)
    try:
        os.kill(template.proc.pid, signal.SIGSTOP)
        template._sock.send(protocol.frame(protocol.FORK_ENDED, b"7"))  # as the node says when a fork ends
        forking = asyncio.ensure_future(template.fork(spawner, 20.0, {}))
        await asyncio.sleep(0)  # the fork's FORK frame is sent before its first wait
        os.kill(template.proc.pid, signal.SIGCONT)
        instance = await forking
        assert await instance.invoke(invocation(b"ok"), 20.0) == b"fine"
        instance.kill()
    finally:
        template.kill()
