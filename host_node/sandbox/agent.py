"""The node's side of its shard spawners: starts them, routes each launch to a shard (borrowing
from a neighbour when the home shard is empty), and turns their messages into futures."""

import asyncio
import itertools
import logging
import os
import platform
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec

from host_node.sandbox import cgroups, forks, ids, protocol, waiter
from host_node.sandbox.cgroups import Layout, Limits
from host_node.sandbox.init import CODE_VIEW, DEPS_VIEW, RUNTIME_VIEW, RootPlan
from host_node.sandbox.pool import choose_shard
from host_node.sandbox.settings import SandboxSettings
from host_node.sandbox.shard_config import ShardConfig
from host_node.spawner import RUNTIME_DIR, SpawnFailed, View, function_env
from schemas.messages import PoolShard

log = logging.getLogger(__name__)

ETC_FILES = ("passwd", "group", "hosts", "nsswitch.conf", "ld.so.cache", "localtime", "alternatives")
REPO_ROOT = Path(__file__).resolve().parents[2]
SHARD_START_TIMEOUT_S = 10.0


class SandboxError(SpawnFailed):
    pass


class SandboxProcess:
    def __init__(self, agent: "ShardedSpawner", shard: int, launched: protocol.Launched):
        self._agent = agent
        self.id = launched.id
        self.shard = shard
        self.pid = launched.pid  # in the host's pid namespace
        self.slot = launched.slot
        self.phases: protocol.Phases | None = launched.phases
        self.oom_killed = False
        self.cpu_s: float | None = None  # the slot's count at exit (protocol.Exited)
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def kill(self) -> None:
        if not self.exited.done():
            self._agent.send_nowait(self.shard, protocol.Kill(self.id))


class ShardLink:
    """One shard spawner process and the socket to it."""

    def __init__(self, index: int, sock: socket.socket, proc: asyncio.subprocess.Process):
        self.index = index
        self.sock = sock
        self.proc = proc
        self.state: PoolShard | None = None
        self.alive = True
        self.ready_estimate = 0  # free slots or prewarmed sandboxes, as last reported, minus launches since
        self.first_state: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class ShardedSpawner:
    def __init__(self, settings: SandboxSettings, node_id: str, work_dir: Path):
        self.settings = settings
        self.node_id = node_id
        self.layout: Layout = cgroups.detect_layout(settings.cgroup_parent, node_id)
        self.plan = _root_plan(settings, work_dir)
        self.userns = settings.use_user_namespaces()
        self._id_lock = -1  # held while the node lives: its block of host ids (ids.claim_block)
        self._id_block = 0
        self.shards: list[ShardLink] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[SandboxProcess], int]] = {}
        self._running: dict[int, SandboxProcess] = {}
        self._assigning: dict[int, asyncio.Future[protocol.Assigned]] = {}  # stem cells, by launch id
        self._next_home = itertools.cycle(range(settings.shard_count()))
        self._closing = False
        self._restarts: set[asyncio.Task] = set()  # shards being started again after a crash
        self._state_changed = asyncio.Event()
        self.launches = 0  # ever asked for

    # -- lifecycle --------------------------------------------------------------------------
    async def open(self) -> None:
        if os.geteuid() != 0:
            raise SandboxError(
                1, f"sandbox mode {self.settings.mode!r} needs root; use mode 'plain' to develop without"
            )
        if platform.machine() != "x86_64":
            raise SandboxError(
                0, f"the sandbox's seccomp filter is written for x86_64, not {platform.machine()}"
            )
        waiter.ensure_built()
        self._id_lock, self._id_block = ids.claim_block(self.settings.sandbox_uid_base)
        cgroups.prepare_subtree(self.layout)
        self._remove_foreign_slots()
        os.makedirs(self.plan.mount_point, exist_ok=True)
        for index in range(self.settings.shard_count()):
            self.shards.append(await self._start_shard(index))
        async with asyncio.timeout(SHARD_START_TIMEOUT_S):
            await asyncio.gather(*(link.first_state for link in self.shards))
        log.info(
            "sandboxes: %s mode, %d shards, host uids %d.. (%s), cgroups %s (%s)",
            self.settings.mode,
            len(self.shards),
            self._id_block,
            "each in its own user namespace" if self.userns else "no user namespaces",
            self.layout.kind,
            self.layout.v2_root or next(iter(self.layout.v1_roots.values())),
        )

    def _remove_foreign_slots(self) -> None:
        """Leftovers this node's shards will not adopt: other shard counts, naive-mode slots."""
        shards = {str(i) for i in range(self.settings.shard_count())}
        for name in cgroups.list_slots(self.layout):
            if not name.startswith("s") or name[1:].split("-")[0] not in shards:
                slot = self.layout.slot(name)
                slot.destroy()

    async def _start_shard(self, index: int) -> ShardLink:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        mode = self.settings.mode
        assert mode != "plain", "plain mode has no shards (PlainSpawner)"
        config = ShardConfig(
            shard=index,
            mode=mode,
            layout=self.layout,
            plan=self.plan,
            pool=self.settings.pool,
            idle_limits=self.settings.limits_for(self.settings.idle_memory_mb),
            userns=self.userns,
            ids=ids.shard_range(self._id_block, index, self.settings.shard_count()),
        )
        theirs.set_inheritable(True)
        env = dict(os.environ) | {"PYTHONPATH": str(REPO_ROOT)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "host_node.sandbox.shard",
            str(theirs.fileno()),
            msgspec.json.encode(config).decode(),
            pass_fds=(theirs.fileno(),),
            env=env,
        )
        theirs.close()
        ours.setblocking(False)
        link = ShardLink(index, ours, proc)
        asyncio.get_running_loop().add_reader(ours.fileno(), self._on_readable, link)
        return link

    def abandon(self) -> None:
        """Stop looking after the shards without stopping them: what a crashed node leaves behind
        (its shards are killed by whoever crashed it). Tests of crash recovery use this."""
        self._closing = True

    async def close(self) -> None:
        self._closing = True
        for task in self._restarts:
            task.cancel()
        for link in self.shards:
            self.send_nowait(link.index, protocol.Stop())
        for link in self.shards:
            try:
                async with asyncio.timeout(5):
                    await link.proc.wait()
            except TimeoutError:
                link.proc.kill()
                await link.proc.wait()
            self._drop_link(link)
        if self._id_lock >= 0:
            os.close(self._id_lock)  # the sandboxes are gone: another node may have the ids
            self._id_lock = -1

    def remove_all_slots(self) -> None:
        """`hetfaas down`: nothing of ours may stay behind in the host's cgroups."""
        cgroups.remove_subtree(self.layout)

    # -- launching --------------------------------------------------------------------------
    def view(self, code_dir: Path | None, deps_dir: Path | None = None) -> View:
        return View(CODE_VIEW, RUNTIME_VIEW, real_python(), DEPS_VIEW if deps_dir else "")

    async def start(
        self,
        argv: list[str],
        code_dir: Path | None,
        limits: Limits,
        fds: list[int],
        deps_dir: Path | None = None,
    ) -> SandboxProcess:
        self.launches += 1
        home = self._home_shard()
        ready = [link.ready_estimate if link.alive and link.state else 0 for link in self.shards]
        shard, borrowed = choose_shard(ready, home, self.settings.mode)
        link = self.shards[shard]
        link.ready_estimate = max(0, link.ready_estimate - 1)
        launch_id = next(self._ids)
        launch = protocol.Launch(
            id=launch_id,
            argv=argv,
            env=function_env(),
            code_dir=str(code_dir) if code_dir else "",
            deps_dir=str(deps_dir) if deps_dir else "",
            limits=limits,
        )
        future: asyncio.Future[SandboxProcess] = asyncio.get_running_loop().create_future()
        self._pending[launch_id] = (future, shard)
        try:
            await self._send(link, launch, fds)
            process = await future
        finally:
            self._pending.pop(launch_id, None)
        if borrowed and process.phases:
            process.phases = msgspec.structs.replace(process.phases, borrowed=True)
        return process

    async def assign(
        self, proc: SandboxProcess, code_dir: Path, deps_dir: Path | None, limits: Limits
    ) -> float:
        """Give a stem cell (started with no code) its function: the function's limits, then its
        code and layer mounted. Returns how long the shard took (µs); SandboxError if it could
        not (the stem cell is killed then)."""
        assign = protocol.Assign(
            id=proc.id, code_dir=str(code_dir), deps_dir=str(deps_dir) if deps_dir else "", limits=limits
        )
        future: asyncio.Future[protocol.Assigned] = asyncio.get_running_loop().create_future()
        self._assigning[proc.id] = future
        try:
            await self._send(self.shards[proc.shard], assign)
            assigned = await future
        finally:
            self._assigning.pop(proc.id, None)
        if assigned.error:
            raise SandboxError(0, assigned.error)
        return assigned.assign_us

    async def adopt(self, template: SandboxProcess, pidfd: int, limits: Limits) -> SandboxProcess:
        """A process the template sandbox forked (named by its pidfd; the caller keeps its fd),
        moved by the template's shard into a slot of its own with `limits`; SandboxError if it
        is not the template's or cannot be moved (it is killed then)."""
        launch_id = next(self._ids)
        future: asyncio.Future[SandboxProcess] = asyncio.get_running_loop().create_future()
        self._pending[launch_id] = (future, template.shard)
        adopt = protocol.Adopt(id=launch_id, template=template.id, limits=limits)
        try:
            await self._send(self.shards[template.shard], adopt, [pidfd])
            process = await future
        finally:
            self._pending.pop(launch_id, None)
        try:
            process.pid = forks.pid_of(pidfd)  # its host pid, for its trace's kernel events
        except (forks.NotAFork, OSError):
            pass  # gone already: its exit is on its way
        return process

    def _home_shard(self) -> int:
        """Round-robin over the shards, skipping one being restarted after a crash."""
        for _ in range(len(self.shards)):
            home = next(self._next_home)
            if self.shards[home].alive:
                return home
        raise SandboxError(0, "no shard spawner is running on this node")

    async def _send(self, link: ShardLink, message: msgspec.Struct, fds: list[int] = ()) -> None:  # type: ignore[assignment]
        while True:
            try:
                protocol.send(link.sock, message, fds)
                return
            except BlockingIOError:
                writable = asyncio.get_running_loop().create_future()
                asyncio.get_running_loop().add_writer(link.sock.fileno(), writable.set_result, None)
                try:
                    await writable
                finally:
                    asyncio.get_running_loop().remove_writer(link.sock.fileno())
            except OSError as exc:
                raise SandboxError(exc.errno, f"shard {link.index} is gone: {exc}") from None

    def send_nowait(self, shard: int, message: msgspec.Struct) -> None:
        try:
            protocol.send(self.shards[shard].sock, message)
        except OSError:
            pass  # a lost shard kills its sandboxes itself

    # -- messages from shards ---------------------------------------------------------------
    def _on_readable(self, link: ShardLink) -> None:
        while True:
            try:
                data, fds = protocol.receive(link.sock)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            for fd in fds:
                os.close(fd)
            if not data:
                self._on_shard_lost(link)
                return
            try:
                self._dispatch(link, protocol.from_shard.decode(data))
            except Exception:  # a bug here must not stop the reader: every launch would hang
                log.exception("shard %d: cannot handle a message", link.index)

    def _dispatch(self, link: ShardLink, message: protocol.FromShard) -> None:
        if isinstance(message, PoolShard):
            link.state = message
            self._state_changed.set()
            self._state_changed = asyncio.Event()
            link.ready_estimate = message.prewarmed if message.mode == "prewarm" else message.free
            if not link.first_state.done():
                link.first_state.set_result(None)
        elif isinstance(message, protocol.Launched):
            pending = self._pending.get(message.id)
            process = SandboxProcess(self, link.index, message)
            self._running[message.id] = process
            if pending and not pending[0].done():
                pending[0].set_result(process)
            else:
                process.kill()  # nobody waits for it any more
        elif isinstance(message, protocol.LaunchFailed):
            pending = self._pending.get(message.id)
            if pending and not pending[0].done():
                pending[0].set_exception(SandboxError(0, message.message))
        elif isinstance(message, protocol.Adopted):
            pending = self._pending.get(message.id)
            if message.error:
                if pending and not pending[0].done():
                    pending[0].set_exception(SandboxError(0, message.error))
                return
            phases = protocol.Phases(
                slot_acquire_us=0, sandbox_setup_us=0, exec_us=0, prewarmed=False, slot_reused=True
            )
            launched = protocol.Launched(id=message.id, pid=0, slot=message.slot, phases=phases)
            process = SandboxProcess(self, link.index, launched)
            self._running[message.id] = process
            if pending and not pending[0].done():
                pending[0].set_result(process)
            else:
                process.kill()
        elif isinstance(message, protocol.Assigned):
            assigning = self._assigning.get(message.id)
            if assigning is not None and not assigning.done():
                assigning.set_result(message)
        elif isinstance(message, protocol.Exited):
            if (assigning := self._assigning.get(message.id)) is not None and not assigning.done():
                assigning.set_exception(
                    SandboxError(0, "the stem cell exited before it was given its function")
                )
            exited = self._running.pop(message.id, None)
            if exited is not None and not exited.exited.done():
                exited.oom_killed, exited.cpu_s = message.oom_killed, message.cpu_s
                exited.exited.set_result(message.status)

    def _on_shard_lost(self, link: ShardLink) -> None:
        self._drop_link(link)
        for future, shard in list(self._pending.values()):
            if shard == link.index and not future.done():
                future.set_exception(SandboxError(0, f"shard {link.index} exited"))
        for launch_id, process in list(self._running.items()):
            if process.shard == link.index:
                if (assigning := self._assigning.get(launch_id)) is not None and not assigning.done():
                    assigning.set_exception(SandboxError(0, f"shard {link.index} exited"))
                del self._running[launch_id]
                if not process.exited.done():
                    process.exited.set_result(-9)
        if not self._closing:
            log.error("shard %d exited; starting it again", link.index)
            task = asyncio.get_running_loop().create_task(self._restart(link.index))
            self._restarts.add(task)
            task.add_done_callback(self._restarts.discard)

    async def _restart(self, index: int) -> None:
        try:
            self.shards[index] = await self._start_shard(index)
        except Exception:  # the node goes on with the shards it has; launches routed here fail
            log.exception("shard %d could not be started again", index)

    def _drop_link(self, link: ShardLink) -> None:
        link.alive = False
        try:
            asyncio.get_running_loop().remove_reader(link.sock.fileno())
        except (ValueError, OSError):
            pass
        link.sock.close()

    def states(self) -> list[PoolShard]:
        return [link.state for link in self.shards if link.state is not None]

    async def wait_for_states(
        self, predicate: Callable[[list[PoolShard]], bool], timeout_s: float = 10.0
    ) -> list[PoolShard]:
        """Wait until the shards' reported states satisfy `predicate` (each report wakes us)."""
        async with asyncio.timeout(timeout_s):
            while not predicate(states := self.states()):
                await self._state_changed.wait()
        return states


def real_python() -> str:
    return os.path.realpath(sys._base_executable if hasattr(sys, "_base_executable") else sys.executable)


def _root_plan(settings: SandboxSettings, work_dir: Path) -> RootPlan:
    prefix = os.path.realpath(sys.base_prefix)
    binds = ["/usr"] + ([prefix] if not prefix.startswith("/usr/") and prefix != "/usr" else [])
    return RootPlan(
        mount_point=str(work_dir / "sandbox-root"),
        ro_binds=binds,
        runtime_dir=str(RUNTIME_DIR),
        waiter=str(waiter.BINARY),
        etc_files=[name for name in ETC_FILES if os.path.exists(os.path.join("/etc", name))],
        tmp_size_mb=settings.tmp_size_mb,
        hostname="sandbox",
        uid=settings.uid,
        gid=settings.gid,
        nofile=settings.nofile,
        own_counts=settings.own_counts(),
    )
