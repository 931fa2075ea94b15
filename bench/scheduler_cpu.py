"""The scheduler's own CPU per invocation, in-process: tracing off, spans made but dropped, spans
made and exported.

`Scheduler.on_invoke` runs N invocations of a warm python function over a view of 2 healthy host
nodes, with a requester that answers at once (no NATS: what is measured is the scheduler's own
work: checks, admission, placement, keep-alive, the NodeInvoke, and tracing). Process CPU time of
all threads (the span exporter's included), the minimum of `--repeat` runs per variant: the
machine's noise only ever adds.

    .venv/bin/python -m bench.scheduler_cpu [--invocations 30000] [--repeat 3]
"""

import argparse
import gc
import tempfile
import time

import uvloop

from fabric import bus, telemetry
from fabric.runner import GC_THRESHOLDS
from scheduler import shares
from scheduler.invoke import Invoker
from scheduler.service import Scheduler
from scheduler.settings import SchedulerSettings
from scheduler.view import ClusterView
from schemas import subjects
from schemas.messages import FunctionRecord, FunctionSpec, Heartbeat, InvokeRequest, NodeRecord

PARENT = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


class AnswersAtOnce:
    """Stands in for the NATS requester: every forward is acknowledged at once."""

    async def request(self, *args: object, **kwargs: object) -> bytes:
        return b""  # an empty acknowledgement: the node answered the caller itself


def scheduler() -> Scheduler:
    settings = SchedulerSettings(scheduler_id="bench", nats_url="", etcd_endpoints=[])
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
    service.invoker = Invoker(settings, None, view, AnswersAtOnce(), lambda: alone, lambda _: 1_000_000)  # type: ignore[arg-type]
    return service


async def cpu_per_invocation(invocations: int, variant: str) -> float:
    service = scheduler()
    subject = subjects.invoke("bench", "echo")
    requests = [
        InvokeRequest(
            invocation_id=f"i-{n}", tenant="bench", function="echo", payload=bytes(64), timeout_ms=10_000
        )
        for n in range(invocations)
    ]
    traced = variant != "off"
    if traced:
        tracer = telemetry.setup_tracing("bench-scheduler", tempfile.mkdtemp(prefix="hetfaas-bench-"), True)
        assert tracer is not None
        if variant == "dropped":
            tracer.exporter._max_queue = 0  # every span made, none queued for export
    headers = PARENT if traced else None
    started = time.process_time()
    try:
        for request in requests:
            ctx = bus.Context(
                subject=subject, headers=headers, received_at=time.monotonic(), reply="_INBOX.b.1"
            )
            if (reply := await service.on_invoke(request, ctx)) is not None:  # placed, forwarded, answered
                raise RuntimeError(f"the benchmark's invocation failed: {reply}")
    finally:
        telemetry.stop_tracing()  # waits for the exporter: its encoding is counted
    return (time.process_time() - started) / invocations * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--invocations", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)  # as the services run
    print(f"| scheduler, per invocation | µs CPU (min of {args.repeat}) |")
    print("|---|---|")
    for variant, label in (
        ("off", "tracing off"),
        ("dropped", "tracing on, spans made but dropped"),
        ("exported", "tracing on, spans exported (OTLP-JSON lines)"),
    ):
        runs = [uvloop.run(cpu_per_invocation(args.invocations, variant)) for _ in range(args.repeat)]
        print(f"| {label} | {min(runs):.1f} |")


if __name__ == "__main__":
    main()
