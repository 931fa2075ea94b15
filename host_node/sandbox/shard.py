"""A shard spawner: the single-threaded process that owns one shard's slots and does its cloning.

Single-threaded on purpose (docs/architecture.md §4): clone3 from a process with other threads can leave the
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

from host_node.sandbox import cloning, forks, init, linux, protocol
from host_node.sandbox.cgroups import Slot, SlotMark
from host_node.sandbox.cloning import close_all
from host_node.sandbox.ids import SandboxIds
from host_node.sandbox.pool import Backoff, RefillPlanner
from host_node.sandbox.shard_config import ShardConfig
from host_node.sandbox.slots import RECYCLE_RETRY_S, SlotStock
from schemas.messages import PoolShard

log = logging.getLogger("hetfaas.shard")

STATE_INTERVAL_S = 0.05


@dataclass(eq=False)
class Sandbox:
    """A cloned child: prewarming, waiting, or running a launch."""

    pid: int
    pidfd: int
    slot: Slot
    uid: int  # its own host uid (ids.py), given back when it is reaped
    status: socket.socket
    slot_reused: bool
    launch: protocol.Launch | None = None
    started_at: float = 0.0
    slot_ready_at: float = 0.0
    exec_ready_at: float = 0.0
    prewarmed: bool = False
    launched: bool = False
    mark: SlotMark | None = None  # the slot's counters when the function began (prewarmed: went idle)
    # code and layer trees (-1: none), then fds, kept until the sandbox is built
    deferred: list[int] = field(default_factory=list)
    error: str = ""


class Shard:
    def __init__(self, config: ShardConfig, control: socket.socket):
        self.config = config
        self.control = control
        self.poller = select.poll()
        self.handlers: dict[int, object] = {}
        now = time.monotonic()
        self.slots = SlotStock(config, self.watch, self.unwatch, now)
        self.prewarm_planner = RefillPlanner(config.pool, now)
        self.backoff = Backoff()  # refill failures (slot creation, prewarmed sandbox setup)
        self.by_id: dict[int, Sandbox] = {}
        self.ids = SandboxIds(config.ids)
        self.own_mount_ns = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        self.building: set[int] = set()  # pidfds of prewarming sandboxes not yet ready
        self.prewarmed: deque[Sandbox] = deque()
        self.forks = forks.Forks(self.slots, self.watch, self.unwatch, self.reply)  # templates' forks
        self.stopping = False
        self._last_state: PoolShard | None = None
        self._state_sent_at = 0.0

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        self.slots.adopt_leftovers()
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
        self.slots.retry_recycling(now)
        wait_s = self.refill(now)
        if self.send_state(now):
            wait_s = min(wait_s, STATE_INTERVAL_S)
        if self.slots.recycling:
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
            close_all(fds)
            return
        if isinstance(message, protocol.Launch):
            self.on_launch(message, fds)
        elif isinstance(message, protocol.Assign):
            self.on_assign(message)
        elif isinstance(message, protocol.Adopt):
            template = self.by_id.get(message.template)
            self.forks.adopt(message, fds, template.pid if template and template.launched else None)
        elif isinstance(message, protocol.Kill):
            sandbox = self.by_id.get(message.id)
            if sandbox is not None:
                kill_sandbox(sandbox)
            else:
                self.forks.kill(message.id)
        else:
            self.stopping = True

    def on_launch(self, launch: protocol.Launch, fds: list[int]) -> None:
        received = time.monotonic()
        self.slots.planner.demand(received)
        self.prewarm_planner.demand(received)
        try:
            trees = open_trees(launch.code_dir, launch.deps_dir)
        except OSError as exc:
            close_all(fds)
            self.reply(
                protocol.LaunchFailed(id=launch.id, message=f"cannot mount the function's code: {exc}")
            )
            return
        try:
            while (sandbox := self.take_prewarmed()) is not None:
                try:
                    self.activate(sandbox, launch, trees, fds, received)
                    return
                except OSError as exc:  # it died waiting; its exit is handled by on_exit
                    log.warning("shard %d: prewarmed sandbox lost: %s", self.config.shard, exc)
                    sandbox.launch = None
                    self.by_id.pop(launch.id, None)
            self.clone_for(launch, trees, fds, received)
        except OSError as exc:
            self.reply(protocol.LaunchFailed(id=launch.id, message=f"sandbox start failed: {exc}"))
        finally:
            close_all([*trees, *fds])  # the child holds its own copies

    def on_assign(self, assign: protocol.Assign) -> None:
        """A stem cell becomes a function's: the function's limits on its slot first (its code
        runs only after this), then its code and layer mounted."""
        started = time.monotonic()
        sandbox = self.by_id.get(assign.id)
        if sandbox is None or not sandbox.launched or sandbox.launch is None or sandbox.launch.code_dir:
            self.reply(protocol.Assigned(id=assign.id, error="no stem cell of that id is running here"))
            return
        trees: list[int] = []
        try:
            self.slots.set_limits(sandbox.slot, assign.limits)
            trees = open_trees(assign.code_dir, assign.deps_dir)
            mounts = [(trees[0], init.CODE_VIEW), (trees[1], init.DEPS_VIEW)]
            cloning.mount_trees(self.own_mount_ns, sandbox.pid, mounts)
        except OSError as exc:
            kill_sandbox(sandbox)  # in a state between idle and the function's: of no use
            self.reply(
                protocol.Assigned(id=assign.id, error=f"cannot give the stem cell its function: {exc}")
            )
            return
        finally:
            close_all([tree for tree in trees if tree >= 0])
        launch = sandbox.launch
        sandbox.launch = msgspec.structs.replace(launch, code_dir=assign.code_dir, limits=assign.limits)
        sandbox.mark = sandbox.slot.mark()
        self.reply(protocol.Assigned(id=assign.id, assign_us=(time.monotonic() - started) * 1e6))

    def reply(self, message: msgspec.Struct) -> None:
        try:
            protocol.send(self.control, message)
        except OSError:
            self.stopping = True

    # -- slots ------------------------------------------------------------------------------
    # -- cloning ----------------------------------------------------------------------------
    def clone_for(self, launch: protocol.Launch, trees: list[int], fds: list[int], received: float) -> None:
        """naive and pool (and a prewarm miss): clone and set up on the start path; the launch goes
        to the child's socket at once, for hetfaas-waiter to read when the sandbox is built."""
        slot, reused = self.slots.acquire(launch.limits)
        mark = slot.mark()
        slot_ready = time.monotonic()
        into = self.config.mode != "naive"
        pid, pidfd, parent, child, uid = self.clone(slot, into)
        userns = self.config.userns
        if pid == 0:
            cloning.child_main(
                self.config, child, cloning.child_attach_files(self.config, slot, into), userns
            )
        child.close()
        sandbox = Sandbox(pid, pidfd, slot, uid, parent, reused, launch, received, slot_ready)
        sandbox.mark = mark
        self.track(sandbox)
        if userns:  # the code can be mounted once the sandbox is built: on its W
            sandbox.deferred = [os.dup(tree) if tree >= 0 else -1 for tree in trees] + [
                os.dup(fd) for fd in fds
            ]
        else:
            self.send_activation(sandbox, launch, trees, fds)

    def clone(self, slot: Slot, into_cgroup: bool) -> tuple[int, int, socket.socket, socket.socket, int]:
        """cloning.clone with a host uid of the sandbox's own; on failure both go back."""
        uid = -1
        try:
            uid = self.ids.take()
            return (*cloning.clone(self.config, slot, into_cgroup, uid), uid)
        except OSError:
            self.ids.give_back(uid)
            self.slots.recycle(slot, ran_launch=False)
            raise

    def send_activation(
        self, sandbox: Sandbox, launch: protocol.Launch, trees: list[int], fds: list[int]
    ) -> None:
        config, mount_ns = self.config, self.own_mount_ns
        pid, status, code_and_deps = sandbox.pid, sandbox.status, (trees[0], trees[1])
        cloning.send_activation(config, sandbox.uid, pid, status, launch, code_and_deps, fds, mount_ns)

    def track(self, sandbox: Sandbox) -> None:
        assert sandbox.launch
        self.by_id[sandbox.launch.id] = sandbox
        self.watch(sandbox.status.fileno(), select.POLLIN, lambda ev, s=sandbox: self.on_status(s))
        self.watch(sandbox.pidfd, select.POLLIN, lambda ev, s=sandbox: self.on_exit(s))

    # -- prewarm ----------------------------------------------------------------------------
    def prewarm_one(self) -> None:
        slot, reused = self.slots.acquire(self.config.idle_limits)
        pid, pidfd, parent, child, uid = self.clone(slot, into_cgroup=True)
        if pid == 0:
            cloning.child_main(self.config, child, cloning.child_attach_files(self.config, slot, True), True)
        child.close()
        sandbox = Sandbox(pid, pidfd, slot, uid, parent, reused, prewarmed=True)
        self.building.add(pidfd)
        self.watch(parent.fileno(), select.POLLIN, lambda ev, s=sandbox: self.on_prewarm_status(s))
        self.watch(pidfd, select.POLLIN, lambda ev, s=sandbox: self.on_exit(s))

    def on_prewarm_status(self, sandbox: Sandbox) -> None:
        data = _recv(sandbox.status)
        if data.startswith(init.READY):
            self.building.discard(sandbox.pidfd)
            self.unwatch(sandbox.status.fileno())
            # Idle from here until its activation, which so need not read the slot's counters
            # on the start path (two cgroupfs reads, ~11 µs each on this VM).
            sandbox.mark = sandbox.slot.mark()
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
        self, sandbox: Sandbox, launch: protocol.Launch, trees: list[int], fds: list[int], received: float
    ) -> None:
        self.slots.set_limits(sandbox.slot, launch.limits)
        sandbox.launch, sandbox.started_at = launch, received
        sandbox.slot_ready_at = time.monotonic()
        self.send_activation(sandbox, launch, trees, fds)
        self.by_id[launch.id] = sandbox
        self.watch(sandbox.status.fileno(), select.POLLIN, lambda ev, s=sandbox: self.on_status(s))

    # -- a launch's progress ----------------------------------------------------------------
    def on_status(self, sandbox: Sandbox) -> None:
        data = _recv(sandbox.status)
        if data.startswith(init.READY) and sandbox.deferred and sandbox.launch:
            trees, fds = sandbox.deferred[:2], sandbox.deferred[2:]
            sandbox.deferred = []
            try:
                self.send_activation(sandbox, sandbox.launch, trees, fds)
            except OSError as exc:
                sandbox.error = f"cannot hand the launch to the sandbox: {exc}"
                kill_sandbox(sandbox)
            finally:
                close_all([fd for fd in trees + fds if fd >= 0])
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
        close_all([fd for fd in sandbox.deferred if fd >= 0])
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
            oom, cpu_s = sandbox.slot.since(sandbox.mark) if sandbox.mark else (False, None)
            if sandbox.launched:
                self.reply(protocol.Exited(id=launch.id, status=status, oom_killed=oom, cpu_s=cpu_s))
            else:
                why = sandbox.error or f"the sandbox exited with status {status} before exec"
                if oom:
                    why += f" (out of memory: {launch.limits.memory_mb} MB is too little to set up in)"
                self.reply(protocol.LaunchFailed(id=launch.id, message=why))
        self.ids.give_back(sandbox.uid)  # its pid namespace, and every process in it, is gone
        self.slots.recycle(sandbox.slot, ran_launch=launch is not None)

    # -- recycling --------------------------------------------------------------------------
    # -- refill -----------------------------------------------------------------------------
    def refill(self, now: float) -> float:
        if self.config.mode == "naive":
            return 1.0
        if not self.backoff.ready(now):
            return self.backoff.wait_s(now)
        if any(not sandbox.launched for sandbox in self.by_id.values()):
            # A burst is still being started: building now would take the CPU it needs.
            self.slots.planner.demand(now)
            self.prewarm_planner.demand(now)
        try:
            self.slots.refill(now)
            if self.config.mode == "prewarm":
                have = len(self.prewarmed) + len(self.building)
                for _ in range(self.prewarm_planner.plan(have, now)):
                    self.prewarm_one()
        except OSError as exc:
            self.refill_failed(f"refilling failed: {exc}")
            return self.backoff.wait_s(now)
        wait_s = _wait_for(self.slots.planner, len(self.slots.pool.free), now)
        if self.config.mode == "prewarm":
            have = len(self.prewarmed) + len(self.building)
            wait_s = min(wait_s, _wait_for(self.prewarm_planner, have, now))
        return max(wait_s, 0.001)

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
    def state(self) -> PoolShard:
        pool = self.slots.pool
        return PoolShard(
            shard=self.config.shard,
            mode=self.config.mode,
            free=len(pool.free),
            prewarmed=len(self.prewarmed),
            busy=len(self.by_id) + len(self.forks),
            recycling=len(self.slots.recycling),
            created=pool.created,
            recycled=pool.recycled,
            ended=pool.released,
            building=len(self.building),
            vanished=pool.vanished,
            inline=pool.inline,
            refilling=self.slots.planner.refilling or self.prewarm_planner.refilling,
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

    def shutdown(self) -> None:
        """Kill every sandbox of this shard; the slots stay for the next start to adopt."""
        for sandbox in [*self.by_id.values(), *self.prewarmed]:
            kill_sandbox(sandbox)
        self.forks.kill_all()


def open_trees(code_dir: str, deps_dir: str) -> list[int]:
    """Detached read-only copies of the code and the dependency layer (-1 for what is absent)."""
    code = linux.open_tree_clone(code_dir) if code_dir else -1
    try:
        return [code, linux.open_tree_clone(deps_dir) if deps_dir else -1]
    except OSError:
        close_all([code] if code >= 0 else [])
        raise


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


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    control = socket.socket(fileno=int(sys.argv[1]))
    config = msgspec.json.decode(sys.argv[2], type=ShardConfig)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent stops us; a terminal's ^C goes to it
    init.build_template(config.plan)
    Shard(config, control).run()


if __name__ == "__main__":
    main()
