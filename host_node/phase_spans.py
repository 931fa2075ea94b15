"""A start's phases as spans: where each phase sits in time, from what the node measured
(`layout`, pure), and the spans recorded under the node's span of an invocation: the phases
(`record_phases`) and the kernel's own events of a start (`record_kernel`, from bcc).

The node measures phase durations (they come back in `InvokeReply.phases_ms`, some from the shard
process that built the sandbox); their order is fixed: fetch the code, acquire an instance (a
cold start: take a slot, set the sandbox up, exec, the interpreter starts (`runtime.start`: what
is left of the acquisition), the runtime's init), run the handler. Laid end
to end from the moment the node received the invocation, they make the waterfall. An exec
function starts a process on every call, so its sandbox phases sit inside the handler's run.
"""

import time
from dataclasses import dataclass

from fabric import telemetry
from fabric.tracing import Deferred, Span
from host_node.kernel_probe import KernelProbe
from schemas.messages import InvokeReply

SANDBOX_PHASES = (
    ("sandbox.slot_acquire", "slot_acquire_ms"),
    ("sandbox.setup", "sandbox_setup_ms"),
    ("sandbox.exec", "exec_ms"),
    ("sandbox.assign", "sandbox_assign_ms"),  # a stem cell given its function's limits and code
    ("template.fork", "template_fork_ms"),  # forked from the function's template, given its own cgroup
)
MS = 1_000_000  # ns


@dataclass(frozen=True)
class PhaseSpan:
    name: str
    start_ns: int
    end_ns: int
    parent: str = ""  # another PhaseSpan's name; "" for the node's span


def layout(
    phases_ms: dict[str, float], start_ns: int, end_ns: int, cold: bool, runtime: str
) -> list[PhaseSpan]:
    spans: list[PhaseSpan] = []
    at = start_ns
    if (fetch := phases_ms.get("bundle_fetch_ms")) is not None:
        spans.append(PhaseSpan("node.bundle_fetch", at, at := at + _ns(fetch)))
    if runtime == "python" and cold and (acquire := phases_ms.get("acquire_ms")) is not None:
        acquire_end = at + _ns(acquire)
        spans.append(PhaseSpan("node.cold_start", at, acquire_end))
        sandbox = _sandbox(phases_ms, at, "node.cold_start")
        spans += sandbox
        if (init := phases_ms.get("runtime_init_ms")) is not None:
            init_start = acquire_end - _ns(init)
            started = sandbox[-1].end_ns if sandbox else at
            if init_start > started:  # the interpreter starting, before it imports the handler
                spans.append(PhaseSpan("runtime.start", started, init_start, "node.cold_start"))
            spans.append(PhaseSpan("runtime.init", init_start, acquire_end, "node.cold_start"))
        at = acquire_end
    if (handler := phases_ms.get("handler_ms")) is not None and (cold or runtime == "exec"):
        handler_start = max(at, end_ns - _ns(handler))
        spans.append(PhaseSpan("node.handler", handler_start, end_ns))
        if runtime == "exec":
            spans += _sandbox(phases_ms, handler_start, "node.handler")
    return spans


def _sandbox(phases_ms: dict[str, float], at: int, parent: str) -> list[PhaseSpan]:
    spans = []
    for name, key in SANDBOX_PHASES:
        if (ms := phases_ms.get(key)) is not None:
            spans.append(PhaseSpan(name, at, at := at + _ns(ms), parent))
    return spans


def _ns(ms: float) -> int:
    return round(ms * MS)


def record_phases(span: Span | Deferred, reply: InvokeReply, runtime: str) -> Span | Deferred | None:
    """The start's phases as children of the node's span (slot, sandbox, exec, init, handler);
    returns the span the kernel's part of the start belongs under (None: no process started)."""
    laid_out = layout(reply.phases_ms, span.start_ns, time.time_ns(), reply.cold_start, runtime)
    parents: dict[str, Span | Deferred | None] = {"": span}
    for phase in laid_out:
        parent = parents.get(phase.parent) or span
        parents[phase.name] = telemetry.record(phase.name, phase.start_ns, phase.end_ns, parent=parent)
    return parents.get("node.cold_start") or (parents.get("node.handler") if runtime == "exec" else None)


async def record_kernel(
    probe: KernelProbe, node_id: str, start: Span | Deferred, node_span: Span | Deferred
) -> None:
    """The kernel's events for this start (fork, exec, cgroup attach, the slot's mkdir), as a
    `kernel` span under it with one event per tracepoint hit, at the kernel's timestamps."""
    pid, slot = node_span.attributes.get("hetfaas.host_pid"), node_span.attributes.get("hetfaas.slot", "")
    if not isinstance(pid, int):
        return
    since_mono = time.monotonic_ns() - (time.time_ns() - node_span.start_ns)
    await probe.drained(time.monotonic_ns())
    found = probe.events_of(pid, node_id, str(slot), since_mono)
    if not found:
        return
    events = [
        (
            f"kernel.{e.tracepoint}",
            e.wall_ns(),
            {"pid": e.pid, "comm": e.comm, **({"cgroup": e.path} if e.path else {})},
        )
        for e in found
    ]
    first, last = events[0][1], events[-1][1]
    attributes = {"hetfaas.kernel_events": len(events)}
    telemetry.record("kernel", first, max(last, first + 1), attributes, parent=start, events=events)
