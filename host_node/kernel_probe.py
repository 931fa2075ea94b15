"""The kernel's side of a cold start, seen through bcc tracepoint programs.

cgroup:cgroup_mkdir, cgroup:cgroup_rmdir, cgroup:cgroup_attach_task, sched:sched_process_fork,
sched:sched_process_exec and sched:sched_process_exit are recorded with kernel timestamps
(CLOCK_MONOTONIC) into a perf buffer; a thread drains it into a short history. After a cold
start the node asks for the events of its process (by host pid: the fork that made it, its
execs, a cgroup attach) and of its slot's cgroup, and adds them to the start's trace.

bcc compiles its C at start (about a second) against kernel headers and needs tracefs mounted:
`deploy/setup.sh` provides both. Where it cannot run (no root, no headers, no bcc), `start()`
logs why once and returns None, and the node traces without kernel events.
"""

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

log = logging.getLogger(__name__)

HISTORY_S = 30.0  # events older than this are dropped
POLL_MS = 100

PROGRAM = r"""
struct event {
    u64 ts;
    u32 kind;
    u32 pid;
    u32 other_pid;
    char comm[16];
    char path[96];
};
BPF_PERF_OUTPUT(events);

static inline void send(void *ctx, struct event *e) {
    events.perf_submit(ctx, e, sizeof(*e));
}

static inline void emit(void *ctx, u32 kind, u32 pid, u32 other) {
    struct event e = {};
    e.ts = bpf_ktime_get_ns();
    e.kind = kind;
    e.pid = pid;
    e.other_pid = other;
    bpf_get_current_comm(&e.comm, sizeof(e.comm));
    send(ctx, &e);
}

TRACEPOINT_PROBE(sched, sched_process_fork) {
    emit(args, 1, args->child_pid, args->parent_pid);
    return 0;
}
TRACEPOINT_PROBE(sched, sched_process_exec) {
    emit(args, 2, args->pid, args->old_pid);
    return 0;
}
TRACEPOINT_PROBE(sched, sched_process_exit) {
    emit(args, 3, args->pid, 0);
    return 0;
}
/* cgroup events carry the cgroup's path (a __data_loc string); bcc allows no map call in a
   macro, hence send() */
#define CGROUP_PROBE(tp, KIND, field, PID)                             \
TRACEPOINT_PROBE(cgroup, tp) {                                         \
    struct event e = {};                                               \
    e.ts = bpf_ktime_get_ns();                                         \
    e.kind = KIND;                                                     \
    e.pid = PID;                                                       \
    bpf_get_current_comm(&e.comm, sizeof(e.comm));                     \
    TP_DATA_LOC_READ_STR(&e.path, field, sizeof(e.path));              \
    send(args, &e);                                                    \
    return 0;                                                          \
}
CGROUP_PROBE(cgroup_attach_task, 4, dst_path, args->pid)
CGROUP_PROBE(cgroup_mkdir, 5, path, 0)
CGROUP_PROBE(cgroup_rmdir, 6, path, 0)
"""

KINDS = {
    1: "sched_process_fork",
    2: "sched_process_exec",
    3: "sched_process_exit",
    4: "cgroup_attach_task",
    5: "cgroup_mkdir",
    6: "cgroup_rmdir",
}


@dataclass(frozen=True)
class KernelEvent:
    at_mono_ns: int  # CLOCK_MONOTONIC, as the kernel stamped it
    tracepoint: str
    pid: int
    other_pid: int  # fork: the parent; exec: the pid before exec
    comm: str
    path: str  # cgroup events: the cgroup's path

    def wall_ns(self) -> int:
        return self.at_mono_ns + (time.time_ns() - time.monotonic_ns())


def select(
    events: list[KernelEvent], pid: int, node_id: str, slot: str, since_mono_ns: int
) -> list[KernelEvent]:
    """The events of one start: its process's fork, execs, cgroup attach and exit, and its
    slot's cgroup being made or removed (the slot's path ends in its name, under the node's)."""
    chosen = []
    for event in events:
        if event.at_mono_ns < since_mono_ns:
            continue
        if event.tracepoint in ("cgroup_mkdir", "cgroup_rmdir"):
            if slot and event.path.endswith("/" + slot) and node_id in event.path:
                chosen.append(event)
        elif event.pid == pid:
            chosen.append(event)
    return chosen


class KernelProbe:
    def __init__(self, bpf: object):
        self._bpf = bpf
        self._events: deque[KernelEvent] = deque()
        self._lock = threading.Lock()
        self._stopping = False
        self._waiting: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        table = bpf["events"]  # type: ignore[index]
        table.open_perf_buffer(self._on_event, page_cnt=256)
        self._table = table
        self._thread = threading.Thread(target=self._poll, name="kernel-probe", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls) -> "KernelProbe | None":
        """The probe, or None (with one log line saying why) where bcc cannot run."""
        try:
            from bcc import BPF  # type: ignore[import-not-found]
        except ImportError:
            log.warning("kernel phases off: bcc is not importable (deploy/setup.sh installs python3-bpfcc)")
            return None
        try:
            return cls(BPF(text=PROGRAM))
        except Exception as exc:  # bcc raises bare Exception when it cannot compile or attach
            log.warning("kernel phases off: bcc cannot load its tracepoint programs here (%s)", exc)
            return None

    def _on_event(self, cpu: int, data: object, size: int) -> None:
        raw = self._table.event(data)
        event = KernelEvent(
            at_mono_ns=raw.ts,
            tracepoint=KINDS.get(raw.kind, "?"),
            pid=raw.pid,
            other_pid=raw.other_pid,
            comm=raw.comm.decode(errors="replace"),
            path=raw.path.decode(errors="replace"),
        )
        with self._lock:
            self._events.append(event)

    def _poll(self) -> None:
        while not self._stopping:
            try:
                self._bpf.perf_buffer_poll(timeout=POLL_MS)  # type: ignore[attr-defined]
            except Exception as exc:  # keep the node alive; say so once
                log.warning("kernel probe stopped: %s", exc)
                return
            self._forget_old()
            self._wake_waiters(time.monotonic_ns())

    def _wake_waiters(self, drained_at: int) -> None:
        with self._lock:
            ready = [w for w in self._waiting if w[0] <= drained_at]
            self._waiting = [w for w in self._waiting if w[0] > drained_at]
        for _, loop, future in ready:
            loop.call_soon_threadsafe(_resolve, future)

    async def drained(self, after_mono_ns: int, timeout_s: float = 1.0) -> None:
        """Until the kernel's buffer has been drained after `after_mono_ns`: its events are in."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._waiting.append((after_mono_ns, asyncio.get_running_loop(), future))
        try:
            await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            pass  # the thread stopped: take what there is

    def _forget_old(self) -> None:
        cutoff = time.monotonic_ns() - int(HISTORY_S * 1e9)
        with self._lock:
            while self._events and self._events[0].at_mono_ns < cutoff:
                self._events.popleft()

    def events_of(self, pid: int, node_id: str, slot: str, since_mono_ns: int) -> list[KernelEvent]:
        """This start's events among those drained so far."""
        with self._lock:
            recent = list(self._events)
        return select(recent, pid, node_id, slot, since_mono_ns)

    def close(self) -> None:
        """Stop draining, close the per-CPU buffers, detach the programs. (The buffers first:
        left to bcc's finalizers at exit they fail noisily on maps already closed.)"""
        self._stopping = True
        self._thread.join(timeout=2)
        for cpu in list(self._table._open_key_fds):
            del self._table[cpu]
        self._bpf.cleanup()  # type: ignore[attr-defined]


def _resolve(future: "asyncio.Future[None]") -> None:
    if not future.done():
        future.set_result(None)
