"""The ceiling of the invocation path's shape: what bare hops cost before any of our logic.

An invocation crosses more processes than a raw request-reply: a scheduler, and a node, which
on a host hands the payload to a warm instance over a socket. This benchmark builds those
shapes from the bare minimum (no placement, no codecs, no accounting: each hop only passes the
bytes on, on `fabric.connection`'s fast path) and measures each against raw request-reply in
the same run, sending 64 in flight with the same nats-py client:

- `raw`: client -> echo responder (nats-py, as `bench.warm_invoke`'s baseline);
- `forwarded`: client -> forwarder -> echo responder, which answers the client directly
  (the scheduler's hop);
- `forwarded + instance`: client -> forwarder -> node -> a worker process over a socketpair,
  running `host_node/runtimes/python_worker.py` with an echo handler, no sandbox
  (the host path's shape; `--nodes` nodes of `--workers` workers, as the host benchmark's 2 x 8).

The ratio of a shape to raw is an upper bound for the path of that shape on this machine.

    .venv/bin/python -m bench.hops [--requests 20000] [--repeat 3]
"""

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path

import msgspec
import nats
import uvloop
from nats.aio.msg import Msg

from bench.cpu_split import cpu_by_role, own_cpu_us
from bench.warm_invoke import measure, paired_ratio, ratio_cell
from deploy.services import free_port, start_nats
from fabric import bus
from fabric.bus import ReplyTo, Requester, Route, Server
from fabric.connection import Connection
from host_node.runtimes import protocol

ENTRY = "bench.hops.entry"
ECHO = "bench.hops.echo"
WORKER = Path(__file__).resolve().parent.parent / "host_node" / "runtimes" / "python_worker.py"
PIPELINED = "forwarded + instance, pipelined"
SHAPES = (
    "raw",
    "forwarded",
    "forwarded by fabric.bus",
    "fabric.bus, inline",
    "forwarded + instance",
    PIPELINED,
)
ROLES = (  # by command line, as bench.cpu_split reads them
    ("python_worker", "worker"),
    ("forward", "forwarder"),
    ("--role\0node", "node"),
    ("echo\0", "echo responder"),  # the bus-built one too
    ("nats-server", "nats-server"),
)


async def forward(url: str, targets: list[str]) -> None:
    """The scheduler's hop and nothing else: each request goes on to the next target in turn,
    keeping the caller's reply subject."""
    nc = Connection()
    await nc.connect(url)
    turn = [0]

    def deliver(subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        turn[0] += 1
        nc.publish_now(targets[turn[0] % len(targets)], data, reply)

    await nc.subscribe_inline(ENTRY, deliver)
    await serve_forever(nc)


class Worker(asyncio.Protocol):
    """The node's end of one worker's socket: the worker runs one payload at a time and answers
    in order; the node may queue more on its socket (`Node.depth`)."""

    def __init__(self, node: "Node") -> None:
        self.node = node
        self.buffer = bytearray()
        self.replies: deque[str] = deque()  # of the payloads sent and not yet answered
        self.listed = False  # in the node's deque of workers with room
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        header = protocol.HEADER.size
        while len(self.buffer) >= header:
            size, kind = protocol.HEADER.unpack_from(self.buffer)
            if len(self.buffer) < header + size:
                return
            body = bytes(self.buffer[header : header + size])
            del self.buffer[: header + size]
            if kind != protocol.READY:  # an answer: the call's number (protocol.SEQ), then the output
                self.node.nc.publish_now(self.replies.popleft(), body[protocol.SEQ.size :])
            self.node.free(self)


NO_SEQ = protocol.SEQ.pack(0)


class Node:
    """A host node's bare shape: requests go to a worker with room (at most `depth` payloads
    on it), in turn, or wait in arrival order."""

    def __init__(self, nc: Connection, depth: int) -> None:
        self.nc = nc
        self.depth = depth
        self.open: deque[Worker] = deque()
        self.waiting: deque[tuple[str, bytes]] = deque()

    def arrived(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        if not self.open:
            self.waiting.append((reply, data))
            return
        worker = self.open.popleft()
        self.send(worker, reply, data)
        if len(worker.replies) < self.depth:
            self.open.append(worker)
        else:
            worker.listed = False

    def send(self, worker: Worker, reply: str, data: bytes) -> None:
        worker.replies.append(reply)
        assert worker.transport is not None
        worker.transport.write(protocol.frame(protocol.INVOKE, NO_SEQ + data))  # answers come in order

    def free(self, worker: Worker) -> None:
        if self.waiting:
            self.send(worker, *self.waiting.popleft())
        elif not worker.listed:
            worker.listed = True
            self.open.append(worker)


def spawn_workers(count: int, code_dir: str) -> list[tuple[subprocess.Popen, socket.socket]]:
    """Worker processes, each with the node's end of its socketpair."""
    workers = []
    for _ in range(count):
        parent, child = socket.socketpair()
        argv = [sys.executable, "-I", "-S", str(WORKER), str(child.fileno()), "main:handle", code_dir]
        workers.append((subprocess.Popen([*argv, str(1 << 20)], pass_fds=[child.fileno()]), parent))
        child.close()
    return workers


async def node(
    url: str, subject: str, depth: int, workers: list[tuple[subprocess.Popen, socket.socket]]
) -> None:
    nc = Connection()
    await nc.connect(url)
    shape = Node(nc, depth)
    loop = asyncio.get_running_loop()
    for _, sock in workers:
        await loop.create_unix_connection(lambda: Worker(shape), sock=sock)
    await nc.subscribe_inline(subject, shape.arrived)
    try:
        await serve_forever(nc)
    finally:
        for proc, _ in workers:
            proc.kill()


class Hop(msgspec.Struct, frozen=True):
    """What the bus-built forwarder sends on: the payload and where to answer (as NodeInvoke)."""

    reply_to: str
    payload: bytes


class Echoed(msgspec.Struct, frozen=True):
    payload: bytes


async def bus_forward(url: str, target: str, inline: bool) -> None:
    """The scheduler's hop through `fabric.bus`: a Server with a task per request, which asks the
    next hop through a Requester and waits for its batched acknowledgement,
    the next hop answering the caller directly. No placement, no accounting, no retries."""
    nc = await bus.connect(url, "hops-forwarder")
    requester = Requester(nc)
    await requester.start()

    async def on_call(payload: bytes, ctx: bus.Context) -> None:
        hop = msgspec.msgpack.encode(Hop(reply_to=ctx.reply, payload=payload))
        await requester.request(target, hop, 10.0, None, "next")

    def on_call_inline(payload: bytes, ctx: bus.Context) -> None:
        hop = msgspec.msgpack.encode(Hop(reply_to=ctx.reply, payload=payload))
        requester.send(target, hop, 10.0, None, "next", acknowledged)

    def acknowledged(outcome: bytes | BaseException) -> None:
        pass

    server = Server(nc, max_concurrent=1024)
    handler = on_call_inline if inline else on_call
    await server.serve([Route(ENTRY, msgspec.msgpack.Decoder(bytes), handler, inline=inline)])
    await serve_forever(nc)


async def bus_echo(url: str) -> None:
    """A node's hop through `fabric.bus`: started eagerly (as a DPU node's invocations), the answer
    to the caller, the acknowledgement batched."""
    nc = await bus.connect(url, "hops-echo")

    async def on_hop(hop: Hop, ctx: bus.Context) -> ReplyTo:
        return ReplyTo(hop.reply_to, Echoed(hop.payload), batch_ack=True)

    server = Server(nc, max_concurrent=1024)
    await server.serve([Route(ECHO, msgspec.msgpack.Decoder(Hop), on_hop, eager=True)])
    await serve_forever(nc)


async def echo(url: str, fast: bool) -> None:
    """On the fast path as a hop of ours would answer; else nats-py's way, as raw's baseline."""
    nc = Connection()
    await nc.connect(url)
    if fast:
        await nc.subscribe_inline(ECHO, lambda subject, reply, data, headers: nc.publish_now(reply, data))
    else:

        async def respond(msg: Msg) -> None:
            await msg.respond(msg.data)

        await nc.subscribe(ECHO, cb=respond)
    await serve_forever(nc)


async def serve_forever(nc: Connection) -> None:
    await nc.flush()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    await nc.close()


async def client_round(url: str, subject: str, requests: int, encoded: bool) -> dict:
    """64 in flight; with `encoded`, the payload goes msgpack-encoded (encoded once) and comes
    back inside an `Echoed`, as the bus-built hops speak."""
    nc = await nats.connect(url)
    payload = os.urandom(64)
    sent = msgspec.msgpack.encode(payload) if encoded else payload
    expected = msgspec.msgpack.encode(Echoed(payload)) if encoded else payload

    async def call() -> None:
        reply = await nc.request(subject, sent, timeout=10)
        if reply.data != expected:
            raise RuntimeError("the echo came back changed")

    try:
        await measure(call, 300, 64)  # warm-up
        return await measure(call, requests, 64)
    finally:
        await nc.close()


def measured_round(url: str, subject: str, requests: int, encoded: bool) -> dict:
    """A client round and each role's CPU µs per request over it (the warm-up's included)."""
    before, client_before = cpu_by_role(ROLES), own_cpu_us()
    cell = uvloop.run(client_round(url, subject, requests, encoded))
    after, client_after = cpu_by_role(ROLES), own_cpu_us()
    cpu = {role: (after[role] - before.get(role, 0.0)) / requests for role in after}
    return cell | {"cpu": cpu | {"client": (client_after - client_before) / requests}}


def start(*role: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.hops", "--role", *role],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", role
    return proc


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.close()
    for proc in procs:
        proc.wait(timeout=10)


def run_shapes(url: str, code_dir: str, args: argparse.Namespace) -> dict[str, list[dict]]:
    rounds: dict[str, list[dict]] = {shape: [] for shape in SHAPES}
    for _ in range(args.repeat):
        for shape in SHAPES:
            procs = shape_processes(url, shape, code_dir, args)
            try:
                subject = ECHO if shape == "raw" else ENTRY
                encoded = "fabric.bus" in shape
                rounds[shape].append(measured_round(url, subject, args.requests, encoded))
            finally:
                stop(procs)
    return rounds


def shape_processes(url: str, shape: str, code_dir: str, args: argparse.Namespace) -> list[subprocess.Popen]:
    if shape == "raw":
        return [start("echo", url)]
    if shape == "forwarded":
        return [start("fast-echo", url), start("forward", url, ECHO)]
    if shape == "forwarded by fabric.bus":
        return [start("bus-echo", url), start("bus-forward", url, ECHO)]
    if shape == "fabric.bus, inline":
        return [start("bus-echo", url), start("bus-forward-inline", url, ECHO)]
    subjects = [f"bench.hops.node.{i}" for i in range(args.nodes)]
    depth = str(args.depth if shape == PIPELINED else 1)
    nodes = [start("node", url, subject, depth, str(args.workers), code_dir) for subject in subjects]
    return [*nodes, start("forward", url, *subjects)]


def report(rounds: dict[str, list[dict]], args: argparse.Namespace) -> str:
    lines = [
        f"64 in flight, 64 B payloads, {args.repeat} rounds of {args.requests} requests each, "
        f"{args.nodes} nodes x {args.workers} workers, pipelined {args.depth} deep",
        "",
        "| shape | req/s (median round) | p50 µs | of raw (median of the rounds' ratios, range) "
        "| µs CPU per request, median round |",
        "|---|---|---|---|---|",
    ]
    for shape in SHAPES:
        cells = sorted(rounds[shape], key=lambda cell: cell["req_per_s"])
        middle = cells[len(cells) // 2]
        ratio = "-" if shape == "raw" else ratio_cell(paired_ratio(rounds["raw"], rounds[shape]))
        cpu = middle["cpu"]
        split = ", ".join(f"{role} {us:.0f}" for role, us in sorted(cpu.items()) if us >= 0.5)
        total = sum(cpu.values())
        lines.append(
            f"| {shape} | {middle['req_per_s']} | {middle['p50_us']} | {ratio} | {total:.0f}: {split} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--depth", type=int, default=4, help="payloads queued per worker, pipelined")
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        role, url, *rest = args.role
        if role in ("echo", "fast-echo"):
            uvloop.run(echo(url, fast=role == "fast-echo"))
        elif role.startswith("bus-forward"):
            uvloop.run(bus_forward(url, rest[0], inline=role.endswith("inline")))
        elif role == "bus-echo":
            uvloop.run(bus_echo(url))
        elif role == "forward":
            uvloop.run(forward(url, rest))
        else:
            subject, depth, workers, code_dir = rest
            uvloop.run(node(url, subject, int(depth), spawn_workers(int(workers), code_dir)))
        return
    with tempfile.TemporaryDirectory(prefix="hetfaas-bench-") as tmp:
        work = Path(tmp)
        (work / "code").mkdir()
        (work / "code" / "main.py").write_text("def handle(payload):\n    return payload\n")
        port = free_port()
        server = start_nats(port, work / "data", work / "nats.conf", work / "nats.log")
        try:
            rounds = run_shapes(f"nats://127.0.0.1:{port}", str(work / "code"), args)
        finally:
            server.terminate()
            server.wait()
    print(report(rounds, args))


if __name__ == "__main__":
    main()
