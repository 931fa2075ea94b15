"""The scheduler's own CPU per invocation, in-process: tracing off, deferred (the decision left to
the node, which keeps nothing: the default's nine in ten), spans made but dropped, spans made and
exported; on the fast path (`Scheduler.on_invoke_now`, what a warm invocation takes) and on the
handler's path (`Scheduler.on_invoke` in a task, what one that must wait takes).

N invocations of a warm python function over a view of 2 healthy host nodes, with a requester
whose acknowledgement comes in the next loop turn (no NATS: what is measured is the scheduler's
own work: checks, admission, placement, keep-alive, the NodeInvoke, waiting for the
acknowledgement, and tracing). Process CPU time of all threads (the span exporter's included),
the minimum of `--repeat` runs per variant: the machine's noise only ever adds.

    .venv/bin/python -m bench.scheduler_cpu [--invocations 30000] [--repeat 3]
"""

import argparse
import asyncio
import gc
import tempfile
import time
from types import SimpleNamespace

import uvloop

from fabric import bus, telemetry
from fabric.runner import GC_THRESHOLDS
from scheduler import shares
from scheduler.capacity import Room
from scheduler.invoke import Invoker
from scheduler.service import INVOKE_SPAN, Scheduler
from scheduler.settings import SchedulerSettings
from scheduler.view import ClusterView
from schemas import subjects
from schemas.messages import FunctionRecord, FunctionSpec, Heartbeat, InvokeRequest, NodeRecord

PARENT = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
# A warm invocation the client's ratio left undecided (fabric/sampling.py): the default's 9 in 10
DEFERRED = {
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
    "tracestate": "hetfaas=defer",
}


class AnswersAtOnce:
    """Stands in for the NATS requester: every forward is acknowledged in the next loop turn,
    with an empty acknowledgement (the node answered the caller itself)."""

    async def request(self, *args: object, **kwargs: object) -> bytes:
        acknowledged: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(acknowledged.set_result, b"")
        return await acknowledged

    def send(self, *args: object, **kwargs: object) -> str:
        answer = args[5]
        asyncio.get_running_loop().call_soon(answer, b"")  # type: ignore[arg-type]
        return "token"


def scheduler() -> Scheduler:
    settings = SchedulerSettings(
        scheduler_id="bench", nats_url="", etcd_endpoints=[], node_stale_after_s=3600
    )
    view = ClusterView()
    now = time.monotonic()
    for i in (1, 2):
        record = NodeRecord(node_id=f"host-{i}", kind="host", hostname="h", pid=1, capacity=64, started_at=0)
        view.put_node(record)
        view.on_heartbeat(Heartbeat(node_id=record.node_id, seq=0, inflight=0, capacity=64, instances=0), now)
    spec = FunctionSpec(name="echo", tenant="bench", runtime="python", handler="main:handle")
    function = FunctionRecord(spec=spec, bundle_digest="sha256-bench", bundle_size=1, deployed_at=0)
    view.put_function(function)
    alone = shares.Replicas(("bench",), "bench")
    service = Scheduler.__new__(Scheduler)  # its handler only: no connections
    service.settings, service.view = settings, view
    # the tenant's limit as the service works it out (its default, the room kept for others)
    service.sync = SimpleNamespace(tenants={})  # type: ignore[assignment]
    service._room, service._room_at = Room(0, 0, {}), 0.0
    service.replicas = lambda: alone  # type: ignore[method-assign]
    limit, weight = service.tenant_limit, service.tenant_weight
    service.invoker = Invoker(settings, None, view, AnswersAtOnce(), lambda: alone, limit, weight)  # type: ignore[arg-type]
    return service


async def handle(service: Scheduler, request: InvokeRequest, ctx: bus.Context, traced: bool) -> object:
    """The handler's path as the server runs it (in the route's span when tracing)."""
    if not traced:
        return await service.on_invoke(request, ctx)
    return await bus.traced_call(INVOKE_SPAN, service.on_invoke, request, ctx)


async def cpu_per_invocation(invocations: int, variant: str, path: str) -> float:
    service = scheduler()
    subject = subjects.invoke("bench", "echo")
    requests = [
        InvokeRequest(
            invocation_id=f"i-{n}", tenant="bench", function="echo", payload=bytes(64), timeout_ms=10_000
        )
        for n in range(invocations)
    ]
    traced = variant != "off"
    spans_dir = tempfile.TemporaryDirectory(prefix="hetfaas-bench-")  # removed with its spans
    if traced:
        tracer = telemetry.setup_tracing("bench-scheduler", spans_dir.name, True)
        assert tracer is not None
        if variant == "dropped":
            tracer.exporter._max_queue = 0  # every span made, none queued for export
    headers = (DEFERRED if variant == "deferred" else PARENT) if traced else None
    started = time.process_time()
    try:
        for request in requests:
            ctx = bus.Context(
                subject=subject, headers=headers, received_at=time.monotonic(), reply="_INBOX.b.1"
            )
            if path == "fast":
                if service.on_invoke_now(request, ctx) is bus.PASS:
                    raise RuntimeError("the fast path did not take a warm invocation")
                await asyncio.sleep(0)  # the acknowledgement's turn
            elif (reply := await asyncio.create_task(handle(service, request, ctx, traced))) is not None:
                raise RuntimeError(f"the benchmark's invocation failed: {reply!r}")
    finally:
        telemetry.stop_tracing()  # waits for the exporter: its encoding is counted
        used = time.process_time() - started
        spans_dir.cleanup()
    return used / invocations * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--invocations", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)  # as the services run
    print(f"| scheduler, per invocation, µs CPU (min of {args.repeat}) | fast path | handler in a task |")
    print("|---|---|---|")
    for variant, label in (
        ("off", "tracing off"),
        ("deferred", "tracing on, a warm invocation left undecided and not kept (the default's 90%)"),
        ("dropped", "tracing on, spans made but dropped"),
        ("exported", "tracing on, spans exported (OTLP-JSON lines)"),
    ):
        runs: dict[str, list[float]] = {"fast": [], "handler": []}
        for _ in range(args.repeat):  # the two paths alternate, so the machine's drift hits both
            for path, times in runs.items():
                times.append(uvloop.run(cpu_per_invocation(args.invocations, variant, path)))
        cells = [f"{min(times):.1f}" for times in runs.values()]
        print(f"| {label} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
