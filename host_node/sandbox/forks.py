"""A shard's forks: processes a template sandbox forked (runtimes/forking.py), each moved into a
slot of its own so that it keeps its own memory, CPU and pids limits. Runs in the shard process.

A fork is named by the pidfd the template's sandbox sent (through the node): the shard takes it
only if it is a live child of the template's init, moves it into every hierarchy of a fresh slot,
and watches the pidfd for its exit (it is the template's child, not the shard's: its status is
not the shard's to read; an OOM kill is told by the slot's counter)."""

import os
import select
import signal
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import msgspec

from host_node.sandbox import cgroups, protocol
from host_node.sandbox.cgroups import Limits, Slot, SlotMark
from host_node.sandbox.slots import SlotStock, Watch

# A fork is its template's child, reaped by it: its exit status is not the shard's to read
EXIT_UNKNOWN = 0


class NotAFork(Exception):
    """The pidfd names no live child of the template: nothing is moved."""


@dataclass(eq=False)
class Fork:
    id: int
    pid: int
    pidfd: int
    slot: Slot
    limits: Limits
    mark: SlotMark  # the slot's counters when the fork was moved in


def pid_of(pidfd: int) -> int:
    """The host pid a pidfd refers to (its fdinfo, in this process's pid namespace)."""
    with open(f"/proc/self/fdinfo/{pidfd}") as info:
        for line in info:
            if line.startswith("Pid:"):
                pid = int(line.split()[1])
                if pid > 0:
                    return pid
    raise NotAFork("the pidfd's process has exited")


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    raise NotAFork(f"process {pid} has no parent")


def alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
        return True
    except ProcessLookupError:
        return False


def adopt(fork_id: int, pidfd: int, template_pid: int, slot: Slot, limits: Limits) -> Fork:
    """Move the process behind `pidfd`, a child of the template's init `template_pid`, into
    `slot` (NotAFork, and nothing moved, if it is not one, or is gone)."""
    try:
        pid = pid_of(pidfd)
        if parent_of(pid) != template_pid:
            raise NotAFork(f"process {pid} is not a child of its template ({template_pid})")
    except OSError as exc:
        raise NotAFork(f"the fork is gone: {exc}") from None
    mark = slot.mark()
    for path in slot.procs_files(include_v2=True):
        cgroups.attach(path, pid)
    if not alive(pidfd):  # it died meanwhile: what was moved, if anything, was it
        raise NotAFork(f"process {pid} exited while it was moved")
    return Fork(fork_id, pid, pidfd, slot, limits, mark)


def kill(fork: Fork) -> None:
    try:
        signal.pidfd_send_signal(fork.pidfd, signal.SIGKILL)
    except (ProcessLookupError, OSError):
        pass
    fork.slot.kill()


def close(fork: Fork) -> None:
    try:
        os.close(fork.pidfd)
    except OSError:
        pass


class Forks:
    """The shard's forks, by launch id: adopted into slots, watched until they exit."""

    def __init__(
        self,
        slots: SlotStock,
        watch: Watch,
        unwatch: Callable[[int], None],
        reply: Callable[[msgspec.Struct], None],
    ):
        self._slots = slots
        self._watch = watch
        self._unwatch = unwatch
        self._reply = reply
        self._by_id: dict[int, Fork] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def adopt(self, message: protocol.Adopt, fds: list[int], template_pid: int | None) -> None:
        """Take the fork behind the pidfd in `fds` into a slot of its own (Adopted), or refuse
        it, killed, with the reason."""
        if template_pid is None or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            self._reply(protocol.Adopted(id=message.id, error="no template of that id is running here"))
            return
        pidfd, slot = fds[0], None
        try:
            slot, _ = self._slots.acquire(message.limits)
            fork = adopt(message.id, pidfd, template_pid, slot, message.limits)
        except (OSError, NotAFork) as exc:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:
                pass
            os.close(pidfd)
            if slot is not None:
                self._slots.recycle(slot, ran_launch=True)
            self._reply(
                protocol.Adopted(id=message.id, error=f"the fork cannot have a slot of its own: {exc}")
            )
            return
        self._by_id[fork.id] = fork
        self._watch(pidfd, select.POLLIN, partial(self._exited, fork))
        self._reply(protocol.Adopted(id=message.id, slot=slot.name))

    def _exited(self, fork: Fork, _events: int = 0) -> None:
        self._unwatch(fork.pidfd)
        close(fork)
        self._by_id.pop(fork.id, None)
        oom, cpu_s = fork.slot.since(fork.mark)
        self._reply(protocol.Exited(id=fork.id, status=EXIT_UNKNOWN, oom_killed=oom, cpu_s=cpu_s))
        self._slots.recycle(fork.slot, ran_launch=True)

    def kill(self, fork_id: int) -> None:
        if (fork := self._by_id.get(fork_id)) is not None:
            kill(fork)

    def kill_all(self) -> None:
        for fork in self._by_id.values():
            kill(fork)
