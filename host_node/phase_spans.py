"""A start's phases as spans: where each phase sits in time, from what the node measured. Pure.

The node measures phase durations (they come back in `InvokeReply.phases_ms`, some from the shard
process that built the sandbox); their order is fixed: fetch the code, acquire an instance (a
cold start: take a slot, set the sandbox up, exec, the interpreter starts (`runtime.start`: what
is left of the acquisition), the runtime's init), run the handler. Laid end
to end from the moment the node received the invocation, they make the waterfall. An exec
function starts a process on every call, so its sandbox phases sit inside the handler's run.
"""

from dataclasses import dataclass

SANDBOX_PHASES = (
    ("sandbox.slot_acquire", "slot_acquire_ms"),
    ("sandbox.setup", "sandbox_setup_ms"),
    ("sandbox.exec", "exec_ms"),
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
