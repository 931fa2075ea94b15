"""What a span costs between system calls, as on the invoke path (not in a tight loop).

A ping-pong over a socketpair with an echo process: each round trip wakes this process from
a read, as a NATS message wakes a service. Per round trip it makes 2 spans as the scheduler
does (under a remote `traceparent`, 4 attributes, one a new invocation id) and finishes them.
Variants: no spans; spans made and dropped (nothing queued); exported as the services do
(`BatchExporter`: a full batch encoded on the loop, written by its thread); exported with the
write on the loop too (is the thread, or the GIL passing to it, what costs?). CPU of this
process per round trip; the variants alternate, `--repeat` rounds each.

    .venv/bin/python -m bench.span_cost [--round-trips 100000] [--repeat 2]
"""

import argparse
import asyncio
import os
import resource
import socket
import tempfile
from pathlib import Path
from typing import Any

import uvloop

from fabric.sampling import sampler_from_env
from fabric.span_export import BatchExporter, file_writer
from fabric.tracing import SpanKind, Tracer

PARENT = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
VARIANTS = ("none", "dropped", "exported", "exported_on_loop")


class LoopWriter(BatchExporter):
    """Writes each full batch on the loop as it is encoded: no thread in the way."""

    def _encode_batch(self) -> None:
        super()._encode_batch()
        while self._bodies:
            self._write(self._bodies.popleft()[1])


class Ping(asyncio.Protocol):
    def __init__(self, tracer: Tracer | None, round_trips: int, done: "asyncio.Future[None]"):
        self.tracer, self.left, self.done = tracer, round_trips, done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(bytes(64))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.tracer is not None:
            for name in ("scheduler.invoke", "scheduler.attempt"):
                attributes: dict[str, Any] = {
                    "faas.invocation_id": f"i-{self.left}",
                    "faas.name": "echo",
                    "hetfaas.tenant": "t",
                    "hetfaas.attempt": 1,
                }
                self.tracer.finish(self.tracer.start(name, PARENT, SpanKind.SERVER, attributes))
        self.left -= 1
        if self.left:
            self.transport.write(data)  # type: ignore[attr-defined]
        else:
            self.done.set_result(None)


def echo(sock: socket.socket) -> None:
    while data := sock.recv(65536):
        sock.sendall(data)
    os._exit(0)


def tracer_for(variant: str, work: Path) -> Tracer | None:
    if variant == "none":
        return None
    exporter_class = LoopWriter if variant == "exported_on_loop" else BatchExporter
    exporter = exporter_class("bench", file_writer(work / f"{variant}.jsonl"))
    if variant == "dropped":
        exporter._max_queue = 0
    return Tracer(exporter, sampler_from_env())


def cpu_per_round_trip(variant: str, round_trips: int, work: Path) -> float:
    ours, theirs = socket.socketpair()
    pid = os.fork()  # before the event loop exists: the child only echoes
    if pid == 0:
        ours.close()
        echo(theirs)
    theirs.close()
    try:
        return uvloop.run(ping(ours, tracer_for(variant, work), round_trips))
    finally:
        os.waitpid(pid, 0)  # it exits when its socket closes


async def ping(sock: socket.socket, tracer: Tracer | None, round_trips: int) -> float:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    before = resource.getrusage(resource.RUSAGE_SELF)
    transport, _ = await loop.create_unix_connection(lambda: Ping(tracer, round_trips, done), sock=sock)
    await done
    if tracer is not None:
        tracer.shutdown()  # what is left is written: counted
    after = resource.getrusage(resource.RUSAGE_SELF)
    transport.close()
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return used / round_trips * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--round-trips", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    runs: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="hetfaas-bench-") as tmp:
        for _ in range(args.repeat):
            for variant in VARIANTS:
                runs[variant].append(cpu_per_round_trip(variant, args.round_trips, Path(tmp)))
    print("| µs of CPU per round trip (2 spans) | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    cells = [", ".join(f"{us:.1f}" for us in runs[variant]) for variant in VARIANTS]
    print("| this process | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
