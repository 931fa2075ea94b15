"""CPU time and resident memory of each function's processes on this node (python instances, and
exec functions' process per call), read from /proc when the metrics are collected, never on the
invocation path.

A process's CPU is read at each collection and once more when the node stops it (a timeout, its
keep-alive over, the function removed); when it exits, its spawner's count replaces the readings
where it is higher: the sandbox's cgroup (everything it started, since the function began) or
wait4's. So an exec call that lives a few milliseconds, between two collections, is counted whole.
"""

import os
from collections.abc import Callable

from fabric import metrics
from host_node.spawner import Process

Labels = tuple[str, ...]  # (faas.name, hetfaas.tenant)
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process (/proc/PID/stat, fields 14 and 15), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from its last ")".
    fields = text[text.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def resident_bytes(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return None


class FunctionUsage:
    """The instances alive, each with the CPU it had used at the last read; what exited instances
    used, per function. Bounded by the node's instances (`max_instances`): an entry leaves when its
    process exits."""

    def __init__(
        self,
        read_cpu: Callable[[int], float | None] = cpu_seconds,
        read_memory: Callable[[int], float | None] = resident_bytes,
    ):
        self._read_cpu, self._read_memory = read_cpu, read_memory
        self._live: dict[Process, tuple[Labels, float]] = {}
        self._exited_cpu: dict[Labels, float] = {}

    def track(self, labels: Labels, proc: Process) -> None:
        self._live[proc] = (labels, 0.0)
        proc.exited.add_done_callback(lambda _: self._exited(proc))

    def _exited(self, proc: Process) -> None:
        labels, used = self._live.pop(proc, ((), 0.0))
        if proc.cpu_s is not None:
            used = max(used, proc.cpu_s)
        if labels:
            self._exited_cpu[labels] = self._exited_cpu.get(labels, 0.0) + used

    def read(self, proc: Process) -> float:
        """The process's CPU seconds now (the last reading once it is gone); the node reads it
        again just before it stops an instance."""
        labels, last = self._live.get(proc, ((), 0.0))
        if not labels:
            return 0.0
        used = self._read_cpu(proc.pid)
        if used is not None and used >= last:
            self._live[proc] = (labels, used)
            return used
        return last

    def cpu(self) -> dict[Labels, float]:
        """CPU seconds per function, a running total (exited instances' included)."""
        totals = dict(self._exited_cpu)
        for proc, (labels, _) in list(self._live.items()):
            totals[labels] = totals.get(labels, 0.0) + self.read(proc)
        return totals

    def memory(self) -> dict[Labels, float]:
        """Resident bytes per function, summed over its live instances."""
        totals: dict[Labels, float] = {}
        for proc, (labels, _) in self._live.items():
            if (rss := self._read_memory(proc.pid)) is not None:
                totals[labels] = totals.get(labels, 0.0) + rss
        return totals

    def register(self, registry: metrics.Registry = metrics.REGISTRY) -> None:
        labels = ("faas.name", "hetfaas.tenant")
        registry.gauge(
            "hetfaas.function.cpu_time",
            "CPU time of the function's processes on this node",
            labels,
            self.cpu,
            monotonic=True,
            unit="s",
        )
        registry.gauge(
            "hetfaas.function.memory",
            "Resident memory of the function's live processes on this node",
            labels,
            self.memory,
            unit="By",
        )
