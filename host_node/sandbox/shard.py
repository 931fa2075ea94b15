"""A shard spawner: the single-threaded process that owns one shard's slots and does its cloning.

Single-threaded on purpose (DESIGN.md §4): clone3 from a process with other threads can leave the
child holding a lock no thread will release. Started by the agent as
`python -m host_node.sandbox.shard FD CONFIG_JSON`; talks to it over the SOCK_SEQPACKET socket FD.
The loop is poll(2) over the control socket, each sandbox's status socket and pidfd, and the
`cgroup.events` of slots being recycled."""

import logging
import os
import select
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import msgspec

from host_node.sandbox import cgroups, init, linux, protocol
from host_node.sandbox.cgroups import Layout, Limits, Slot
from host_node.sandbox.pool import Backoff, PoolSettings, RefillPlanner, SlotPool

log = logging.getLogger("hetfaas.shard")

NAMESPACES = (
    linux.CLONE_NEWNS | linux.CLONE_NEWPID | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS | linux.CLONE_NEWNET
)
STATE_INTERVAL_S = 0.05
RECYCLE_RETRY_S = 0.01
RECYCLE_GIVE_UP_S = 5.0


class ShardConfig(msgspec.Struct, frozen=True, kw_only=True):
    shard: int
    mode: str
    layout: Layout
    plan: init.RootPlan
    pool: PoolSettings
    idle_limits: Limits  # what an idle slot (or a prewarmed sandbox) is held to
    userns_base_uid: int  # 0: no user namespace; else sandbox ids 0..65535 are host ids base+0..


@dataclass(eq=False)
class Sandbox:
    """A cloned child: prewarming, waiting, or running a launch."""

    pid: int
    pidfd: int
    slot: Slot
    status: socket.socket
    slot_reused: bool
    launch: protocol.Launch | None = None
    started_at: float = 0.0
    slot_ready_at: float = 0.0
    exec_ready_at: float = 0.0
    prewarmed: bool = False
    launched: bool = False
    oom_kills_before: int = 0
    deferred: list[int] = field(default_factory=list)  # code tree and fds kept until the sandbox is built
    error: str = ""


class Shard:
    def __init__(self, config: ShardConfig, control: socket.socket):
        self.config = config
        self.control = control
        self.poller = select.poll()
        self.handlers: dict[int, object] = {}
        self.pool = SlotPool(config.shard)
        now = time.monotonic()
        self.slot_planner = RefillPlanner(config.pool, now)
        self.prewarm_planner = RefillPlanner(config.pool, now)
        self.backoff = Backoff()  # refill failures (slot creation, prewarmed sandbox setup)
        self.by_id: dict[int, Sandbox] = {}
        self.own_mount_ns = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        self.limits: dict[str, Limits] = {}  # slot name -> the size class it holds
        self.building: set[int] = set()  # pidfds of prewarming sandboxes not yet ready
        self.prewarmed: deque[Sandbox] = deque()
        self.recycling: dict[str, tuple[Slot, float, int | None]] = {}
        self.stopping = False
        self._last_state: protocol.ShardState | None = None
        self._state_sent_at = 0.0

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        self.adopt_leftovers()
        self.watch(self.control.fileno(), select.POLLIN, self.on_control)
        while not self.stopping:
            timeout_s = self.tick()
            for fd, events in self.poller.poll(timeout_s * 1000):
                handler = self.handlers.get(fd)
                if handler is not None:
                    handler(events)  # type: ignore[operator]
        self.shutdown()

    def tick(self) -> float:
        """Timers: refill, retry recycling, report state. Returns how long poll may sleep."""
        now = time.monotonic()
        self.retry_recycling(now)
        wait_s = self.refill(now)
        if self.send_state(now):
            wait_s = min(wait_s, STATE_INTERVAL_S)
        if self.recycling:
            wait_s = min(wait_s, RECYCLE_RETRY_S)
        return wait_s

    def watch(self, fd: int, events: int, handler) -> None:
        self.handlers[fd] = handler
        self.poller.register(fd, events)

    def unwatch(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            self.poller.unregister(fd)

    # -- control messages -------------------------------------------------------------------
    def on_control(self, _events: int) -> None:
        data, fds = protocol.receive(self.control)
        if not data:
            self.stopping = True  # the agent is gone
            return
        try:
            message = protocol.to_shard.decode(data)
        except msgspec.DecodeError as exc:
            log.error("shard %d: undecodable control message: %s", self.config.shard, exc)
            _close_all(fds)
            return
        if isinstance(message, protocol.Launch):
            self.on_launch(message, fds)
        elif isinstance(message, protocol.Kill):
            sandbox = self.by_id.get(message.id)
            if sandbox is not None:
                kill_sandbox(sandbox)
        else:
            self.stopping = True

    def on_launch(self, launch: protocol.Launch, fds: list[int]) -> None:
        received = time.monotonic()
        self.slot_planner.demand(received)
        self.prewarm_planner.demand(received)
        try:
            code_tree = linux.open_tree_clone(launch.code_dir)
        except OSError as exc:
            _close_all(fds)
            self.reply(
                protocol.LaunchFailed(id=launch.id, message=f"cannot mount the function's code: {exc}")
            )
            return
        try:
            while (sandbox := self.take_prewarmed()) is not None:
                try:
                    self.activate(sandbox, launch, code_tree, fds, received)
                    return
                except OSError as exc:  # it died waiting; its exit is handled by on_exit
                    log.warning("shard %d: prewarmed sandbox lost: %s", self.config.shard, exc)
                    sandbox.launch = None
                    self.by_id.pop(launch.id, None)
            self.clone_for(launch, code_tree, fds, received)
        except OSError as exc:
            self.reply(protocol.LaunchFailed(id=launch.id, message=f"sandbox start failed: {exc}"))
        finally:
            _close_all([code_tree, *fds])  # the child holds its own copies

    def reply(self, message: msgspec.Struct) -> None:
        try:
            protocol.send(self.control, message)
        except OSError:
            self.stopping = True

    # -- slots ------------------------------------------------------------------------------
    def acquire_slot(self, limits: Limits) -> tuple[Slot, bool]:
        """A slot with `limits` applied: from the pool, else created inline. (slot, reused)"""
        layout = self.config.layout
        if self.config.mode != "naive":
            while (name := self.pool.take()) is not None:
                slot = layout.slot(name)
                try:
                    if not slot.exists():  # another cgroup manager pruned it while it was empty
                        raise FileNotFoundError(name)
                    self.set_limits(slot, limits)
                    return slot, True
                except FileNotFoundError:
                    log.warning("shard %d: slot %s vanished; replacing it", self.config.shard, name)
                    slot.remove()
                    self.forget(name, vanished=True)
        slot = layout.slot(self.pool.new_name(naive=self.config.mode == "naive"))
        slot.create()
        self.pool.mark_busy(slot.name, inline=self.config.mode != "naive")
        self.set_limits(slot, limits)
        return slot, False

    def set_limits(self, slot: Slot, limits: Limits) -> None:
        """Apply a size class, writing only the limits that change (the slot's are remembered)."""
        try:
            slot.apply(limits, self.limits.get(slot.name))
        except BaseException:
            self.limits.pop(slot.name, None)  # unknown now: the next apply writes everything
            raise
        self.limits[slot.name] = limits

    def forget(self, name: str, vanished: bool) -> None:
        self.pool.drop(name, vanished)
        self.limits.pop(name, None)

    def create_free_slot(self) -> None:
        slot = self.config.layout.slot(self.pool.new_name())
        slot.create()
        self.set_limits(slot, self.config.idle_limits)
        self.pool.add_free(slot.name, recycled=False)

    # -- cloning ----------------------------------------------------------------------------
    def clone(self, slot: Slot, into_cgroup: bool) -> tuple[int, int, socket.socket, socket.socket]:
        """clone3 a child into new namespaces (and, when allowed, straight into the slot's cgroup2).
        Returns pid 0 in the child, which closes the inherited fds and joins the rest of its
        cgroups itself, except in a user namespace: then the parent maps its ids and attaches it
        (the child has no rights over the host's cgroup files), then tells it to go on."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cgroup_fd = -1
        flags = NAMESPACES | (linux.CLONE_NEWUSER if self.config.userns_base_uid else 0)
        try:
            cgroup_fd = slot.open_v2() if into_cgroup and slot.v2_dir else -1
            pid, pidfd = linux.clone3(flags, cgroup_fd)
        except OSError:
            _close_all([parent.detach(), child.detach()] + ([cgroup_fd] if cgroup_fd >= 0 else []))
            raise
        if pid == 0:
            return pid, pidfd, parent, child
        if cgroup_fd >= 0:
            os.close(cgroup_fd)
        if self.config.userns_base_uid:
            try:
                init.map_ids(pid, self.config.userns_base_uid)
                for path in slot.procs_files(include_v2=cgroup_fd < 0):
                    cgroups.attach(path, pid)
                parent.send(init.GO)
            except OSError:
                os.kill(pid, signal.SIGKILL)  # on_exit reaps it and reports why
        return pid, pidfd, parent, child

    def child_attach_files(self, slot: Slot, cloned_into: bool) -> list[str]:
        """The cgroups the child joins by itself (none in a user namespace: the parent does it)."""
        if self.config.userns_base_uid:
            return []
        return slot.procs_files(include_v2=not cloned_into)

    def clone_for(self, launch: protocol.Launch, code_tree: int, fds: list[int], received: float) -> None:
        """naive and pool (and a prewarm miss): clone and set up on the start path; the launch goes
        to the child's socket at once, for hetfaas-waiter to read when the sandbox is built."""
        slot, reused = self.acquire_slot(launch.limits)
        oom_kills = slot.oom_kills()
        slot_ready = time.monotonic()
        into = self.config.mode != "naive"
        pid, pidfd, parent, child = self.clone(slot, into)
        userns = bool(self.config.userns_base_uid)
        if pid == 0:
            self.child_main(child, self.child_attach_files(slot, into), announce=userns)
        child.close()
        sandbox = Sandbox(pid, pidfd, slot, parent, reused, launch, received, slot_ready)
        sandbox.oom_kills_before = oom_kills
        self.track(sandbox)
        if userns:  # the code can be mounted once the sandbox is built: on its W
            sandbox.deferred = [os.dup(code_tree), *(os.dup(fd) for fd in fds)]
        else:
            self.send_activation(sandbox, launch, code_tree, fds)

    def child_main(self, status: socket.socket, attach_files: list[str], announce: bool) -> None:
        """In the clone: build the sandbox, (announce it is ready,) become hetfaas-waiter."""
        try:
            init.close_inherited([status.fileno()])
            linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
            if self.config.userns_base_uid:
                if status.recv(16) != init.GO:
                    os._exit(1)  # the parent could not map our ids: it kills us anyway
            init.prepare(self.config.plan, attach_files, userns=bool(self.config.userns_base_uid))
            if self.config.userns_base_uid:
                # Only now: as the host's uid 0 we could still walk the host's 0700 directories
                # to the template (e.g. under /root); inside the sandbox that no longer matters.
                init.become_namespace_root()
            if announce:
                init.report(status, init.READY)
        except BaseException as exc:
            init.fail(status, f"sandbox setup failed: {exc}")
        init.exec_waiter(status)

    def send_activation(
        self, sandbox: Sandbox, launch: protocol.Launch, code_tree: int, fds: list[int]
    ) -> None:
        """Hand the launch to the sandbox's hetfaas-waiter. In a user namespace the code is mounted
        from here: the kernel lets no namespace-root move a host-owned mount in itself."""
        if self.config.userns_base_uid:
            self.mount_code(sandbox.pid, code_tree)
            data = init.activation(self.config.plan, launch.argv, launch.env, code_mounted=True)
            protocol.send_bytes(sandbox.status, data, fds)
        else:
            data = init.activation(self.config.plan, launch.argv, launch.env, code_mounted=False)
            protocol.send_bytes(sandbox.status, data, [code_tree, *fds])

    def mount_code(self, pid: int, code_tree: int) -> None:
        """Enter the sandbox's mount namespace (this process is single-threaded: setns is safe),
        attach the code at /code, and come back."""
        target = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.setns(target, linux.CLONE_NEWNS)
            try:
                linux.move_mount(code_tree, init.CODE_VIEW)
            finally:
                linux.setns(self.own_mount_ns, linux.CLONE_NEWNS)
        finally:
            os.close(target)

    def track(self, sandbox: Sandbox) -> None:
        assert sandbox.launch
        self.by_id[sandbox.launch.id] = sandbox
        self.watch(sandbox.status.fileno(), select.POLLIN, lambda ev, s=sandbox: self.on_status(s))
        self.watch(sandbox.pidfd, select.POLLIN, lambda ev, s=sandbox: self.on_exit(s))

    # -- prewarm ----------------------------------------------------------------------------
    def prewarm_one(self) -> None:
        slot, reused = self.acquire_slot(self.config.idle_limits)
        pid, pidfd, parent, child = self.clone(slot, into_cgroup=True)
        if pid == 0:
            self.child_main(child, self.child_attach_files(slot, cloned_into=True), announce=True)
        child.close()
        sandbox = Sandbox(pid, pidfd, slot, parent, reused, prewarmed=True)
        self.building.add(pidfd)
        self.watch(parent.fileno(), select.POLLIN, lambda ev, s=sandbox: self.on_prewarm_status(s))
        self.watch(pidfd, select.POLLIN, lambda ev, s=sandbox: self.on_exit(s))

    def on_prewarm_status(self, sandbox: Sandbox) -> None:
        data = _recv(sandbox.status)
        if data.startswith(init.READY):
            self.building.discard(sandbox.pidfd)
            self.unwatch(sandbox.status.fileno())
            self.prewarmed.append(sandbox)
            self.backoff.succeeded()
            return
        sandbox.error = data[1:].decode(errors="replace") or "prewarmed sandbox exited during setup"
        self.refill_failed(f"prewarming a sandbox failed: {sandbox.error}")
        self.unwatch(sandbox.status.fileno())
        kill_sandbox(sandbox)

    def take_prewarmed(self) -> Sandbox | None:
        if self.config.mode != "prewarm" or not self.prewarmed:
            return None
        return self.prewarmed.popleft()

    def activate(
        self, sandbox: Sandbox, launch: protocol.Launch, code_tree: int, fds: list[int], received: float
    ) -> None:
        self.set_limits(sandbox.slot, launch.limits)
        sandbox.oom_kills_before = sandbox.slot.oom_kills()
        sandbox.launch, sandbox.started_at = launch, received
        sandbox.slot_ready_at = time.monotonic()
        self.send_activation(sandbox, launch, code_tree, fds)
        self.by_id[launch.id] = sandbox
        self.watch(sandbox.status.fileno(), select.POLLIN, lambda ev, s=sandbox: self.on_status(s))

    # -- a launch's progress ----------------------------------------------------------------
    def on_status(self, sandbox: Sandbox) -> None:
        data = _recv(sandbox.status)
        if data.startswith(init.READY) and sandbox.deferred and sandbox.launch:
            code_tree, *fds = sandbox.deferred
            sandbox.deferred = []
            try:
                self.send_activation(sandbox, sandbox.launch, code_tree, fds)
            except OSError as exc:
                sandbox.error = f"cannot hand the launch to the sandbox: {exc}"
                kill_sandbox(sandbox)
            finally:
                _close_all([code_tree, *fds])
            return
        if data.startswith(init.EXECUTING):
            sandbox.exec_ready_at = float(data[1:])
            return
        if data.startswith(init.FAILED):
            sandbox.error = data[1:].decode(errors="replace")
            return
        self.unwatch(sandbox.status.fileno())  # end of file: execve succeeded, or the child died
        if not sandbox.error and sandbox.exec_ready_at:
            self.report_launched(sandbox, time.monotonic())

    def drain_status(self, sandbox: Sandbox) -> None:
        """The child is dead: read what it said before it went (its exit may be seen first)."""
        sandbox.status.setblocking(False)
        while data := _recv(sandbox.status):
            if data.startswith(init.EXECUTING):
                sandbox.exec_ready_at = float(data[1:])
            elif data.startswith(init.FAILED):
                sandbox.error = data[1:].decode(errors="replace")
        if not sandbox.error and sandbox.exec_ready_at:
            self.report_launched(sandbox, time.monotonic())  # it ran, and was quick about it

    def report_launched(self, sandbox: Sandbox, exec_done: float) -> None:
        assert sandbox.launch
        sandbox.launched = True
        phases = protocol.Phases(
            slot_acquire_us=(sandbox.slot_ready_at - sandbox.started_at) * 1e6,
            sandbox_setup_us=(sandbox.exec_ready_at - sandbox.slot_ready_at) * 1e6,
            exec_us=(exec_done - sandbox.exec_ready_at) * 1e6,
            prewarmed=sandbox.prewarmed,
            slot_reused=sandbox.slot_reused,
        )
        self.reply(
            protocol.Launched(id=sandbox.launch.id, pid=sandbox.pid, slot=sandbox.slot.name, phases=phases)
        )

    def on_exit(self, sandbox: Sandbox) -> None:
        try:
            result = os.waitid(os.P_PIDFD, sandbox.pidfd, os.WEXITED)
        except ChildProcessError:
            result = None
        self.unwatch(sandbox.pidfd)
        self.unwatch(sandbox.status.fileno())
        _close_all(sandbox.deferred)
        sandbox.deferred = []
        if sandbox.launch is not None and not sandbox.launched:
            self.drain_status(sandbox)
        os.close(sandbox.pidfd)
        sandbox.status.close()
        self.building.discard(sandbox.pidfd)
        if sandbox in self.prewarmed:
            self.prewarmed.remove(sandbox)
        status = _exit_status(result)
        launch = sandbox.launch
        if launch is not None:
            self.by_id.pop(launch.id, None)
            if sandbox.launched:
                oom = sandbox.slot.oom_kills() > sandbox.oom_kills_before
                self.reply(protocol.Exited(id=launch.id, status=status, oom_killed=oom))
            else:
                why = sandbox.error or f"the sandbox exited with status {status} before exec"
                if sandbox.slot.oom_kills() > sandbox.oom_kills_before:
                    why += f" (out of memory: {launch.limits.memory_mb} MB is too little to set up in)"
                self.reply(protocol.LaunchFailed(id=launch.id, message=why))
        self.recycle(sandbox.slot, ran_launch=launch is not None)

    # -- recycling --------------------------------------------------------------------------
    def recycle(self, slot: Slot, ran_launch: bool) -> None:
        """After a sandbox's init is reaped: its pid namespace took every process with it, so the
        slot is usually empty at once; a sweep (and waiting on cgroup.events) covers the rest."""
        self.recycling[slot.name] = (slot, time.monotonic(), None)
        if ran_launch:
            self.pool.released += 1  # counted now: "every launch so far has ended" is then exact
        if slot.populated():
            slot.kill()
        self.try_finish_recycle(slot)

    def try_finish_recycle(self, slot: Slot) -> None:
        if slot.populated():
            if self.recycling[slot.name][2] is None and (fd := slot.events_fd()) is not None:
                self.recycling[slot.name] = (*self.recycling[slot.name][:2], fd)
                self.watch(fd, select.POLLPRI, lambda ev, s=slot: self.try_finish_recycle(s))
            return
        _, _, fd = self.recycling.pop(slot.name)
        if fd is not None:
            self.unwatch(fd)
            os.close(fd)
        if self.config.mode == "naive" or not slot.is_clean():
            slot.remove()
            self.forget(slot.name, vanished=False)
            return
        try:
            self.set_limits(slot, self.config.idle_limits)
        except FileNotFoundError:
            self.forget(slot.name, vanished=True)
            return
        self.pool.add_free(slot.name, recycled=True)

    def retry_recycling(self, now: float) -> None:
        for name, (slot, since, _fd) in list(self.recycling.items()):
            if now - since > RECYCLE_GIVE_UP_S:
                log.error(
                    "shard %d: slot %s stays populated; removing it from the pool", self.config.shard, name
                )
                slot.kill()
                self.recycling.pop(name)
                self.forget(name, vanished=False)
                continue
            slot.kill()
            self.try_finish_recycle(slot)

    # -- refill -----------------------------------------------------------------------------
    def refill(self, now: float) -> float:
        if self.config.mode == "naive":
            return 1.0
        if not self.backoff.ready(now):
            return self.backoff.wait_s(now)
        if any(not sandbox.launched for sandbox in self.by_id.values()):
            # A burst is still being started: building now would take the CPU it needs.
            self.slot_planner.demand(now)
            self.prewarm_planner.demand(now)
        try:
            self.refill_slots(now)
            if self.config.mode == "prewarm":
                have = len(self.prewarmed) + len(self.building)
                for _ in range(self.prewarm_planner.plan(have, now)):
                    self.prewarm_one()
        except OSError as exc:
            self.refill_failed(f"refilling failed: {exc}")
            return self.backoff.wait_s(now)
        wait_s = _wait_for(self.slot_planner, len(self.pool.free), now)
        if self.config.mode == "prewarm":
            have = len(self.prewarmed) + len(self.building)
            wait_s = min(wait_s, _wait_for(self.prewarm_planner, have, now))
        return max(wait_s, 0.001)

    def refill_slots(self, now: float) -> None:
        if count := self.slot_planner.plan(len(self.pool.free), now):
            if cgroups.nr_dying(self.config.layout) < self.config.pool.max_dying:
                for _ in range(count):
                    self.create_free_slot()

    def refill_failed(self, why: str) -> None:
        delay = self.backoff.failed(time.monotonic())
        if self.backoff.failures <= 3 or self.backoff.failures % 100 == 0:
            log.error(
                "shard %d: %s (failure %d; next try in %.1fs)",
                self.config.shard,
                why,
                self.backoff.failures,
                delay,
            )

    # -- state and lifecycle ----------------------------------------------------------------
    def state(self) -> protocol.ShardState:
        pool = self.pool
        return protocol.ShardState(
            shard=self.config.shard,
            mode=self.config.mode,
            free=len(pool.free),
            prewarmed=len(self.prewarmed),
            busy=len(self.by_id),
            recycling=len(self.recycling),
            created=pool.created,
            recycled=pool.recycled,
            ended=pool.released,
            building=len(self.building),
            vanished=pool.vanished,
            inline=pool.inline,
            refilling=self.slot_planner.refilling or self.prewarm_planner.refilling,
        )

    def send_state(self, now: float) -> bool:
        """Report a changed state, at most every STATE_INTERVAL_S; True if one is still held back."""
        state = self.state()
        if state == self._last_state:
            return False
        if now - self._state_sent_at < STATE_INTERVAL_S:
            return True
        self._last_state, self._state_sent_at = state, now
        self.reply(state)
        return False

    def adopt_leftovers(self) -> None:
        """Slots of this shard left by a crashed node: kill what runs in them, keep the clean ones."""
        mine = [
            n for n in cgroups.list_slots(self.config.layout) if n.split("-")[0][1:] == str(self.config.shard)
        ]
        for name in sorted(mine):
            slot = self.config.layout.slot(name)
            slot.kill()
            if name.startswith("s") and _wait_empty(slot) and slot.is_clean():
                self.set_limits(slot, self.config.idle_limits)
                self.pool.adopt(name)
            else:
                slot.destroy()

    def shutdown(self) -> None:
        """Kill every sandbox of this shard; the slots stay for the next start to adopt."""
        for sandbox in [*self.by_id.values(), *self.prewarmed]:
            kill_sandbox(sandbox)


def kill_sandbox(sandbox: Sandbox) -> None:
    """Kill the sandbox's init (its pid namespace dies with it), then whatever else is in its slot."""
    try:
        signal.pidfd_send_signal(sandbox.pidfd, signal.SIGKILL)
    except (ProcessLookupError, OSError):
        pass  # already gone (or reaped)
    sandbox.slot.kill()


def _wait_for(planner: RefillPlanner, have: int, now: float) -> float:
    if planner.in_cycle or have < planner.settings.low_water:
        return planner.next_check_s(now)
    return 1.0


def _wait_empty(slot: Slot, timeout_s: float = 2.0) -> bool:
    """Start-up only (adopting leftovers): block until the slot's cgroup has no process."""
    fd = slot.events_fd()
    poller = select.poll()
    if fd is not None:
        poller.register(fd, select.POLLPRI)
    deadline = time.monotonic() + timeout_s
    try:
        while slot.populated():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(min(left, RECYCLE_RETRY_S) * 1000)  # events, or a v1 re-check
        return True
    finally:
        if fd is not None:
            os.close(fd)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(protocol.MAX_MESSAGE)
    except OSError:
        return b""


def _exit_status(result: os.waitid_result | None) -> int:
    if result is None:
        return -1
    if result.si_code == os.CLD_EXITED:
        return result.si_status
    return -result.si_status


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    control = socket.socket(fileno=int(sys.argv[1]))
    config = msgspec.json.decode(sys.argv[2], type=ShardConfig)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent stops us; a terminal's ^C goes to it
    init.build_template(config.plan)
    Shard(config, control).run()


if __name__ == "__main__":
    main()
