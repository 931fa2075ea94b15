"""A service's own CPU per request on the bus: nats-py's callback subscription against
`fabric.connection`'s fast path, in the same run, with and without a `traceparent` header.

One responder process answers N requests from a client process sending 64 at a time through a
real nats-server; the responder's CPU time (from its first request to its last) over N:

- `nats-py`: a callback subscription, the answer published from the callback (nats-py's way);
- `nats-py + task`: the same with a task per request, as a service must run handlers that wait
  (what `fabric.bus.Server` did before the fast path);
- `fast path`: `Connection.subscribe_inline`, the answer by `publish_now`;
- `fast path + task`: the same with a task per request (what `Server` does now).

    .venv/bin/python -m bench.bus_path [--requests 40000] [--repeat 3]
"""

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import nats
import uvloop
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from deploy.services import free_port, start_nats
from fabric.connection import Connection

SUBJECT = "bench.bus"
HEADERS = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
MODES = ("nats-py", "nats-py + task", "fast path", "fast path + task")


async def respond(url: str, mode: str, requests: int) -> float:
    """Serve `requests` requests; the µs of CPU per request from the first to the last."""
    fast = mode.startswith("fast")
    nc = Connection() if fast else NATS()
    await nc.connect(url)
    done, tasks = asyncio.Event(), set()
    started = [0.0]
    count = 0

    def arrived() -> None:
        nonlocal count
        if count == 0:
            started[0] = time.process_time()
        count += 1
        if count == requests:
            done.set()

    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    if fast:
        assert isinstance(nc, Connection)

        async def answer_fast(reply: str, data: bytes) -> None:
            nc.publish_now(reply, data)

        def deliver(subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
            arrived()
            if mode == "fast path":
                nc.publish_now(reply, data)
            else:
                spawn(answer_fast(reply, data))

        await nc.subscribe_inline(SUBJECT, deliver)
    else:

        async def answer(msg: Msg) -> None:
            await nc.publish(msg.reply, msg.data)

        async def callback(msg: Msg) -> None:
            arrived()
            if mode == "nats-py":
                await answer(msg)
            else:
                spawn(answer(msg))

        await nc.subscribe(SUBJECT, cb=callback)
    await nc.flush()
    print("ready", flush=True)
    await done.wait()
    cpu_us = (time.process_time() - started[0]) / requests * 1e6
    await nc.flush()
    await nc.close()
    return cpu_us


async def send(url: str, requests: int, headers: dict[str, str] | None) -> None:
    nc = await nats.connect(url)

    async def worker(count: int) -> None:
        for _ in range(count):
            await nc.request(SUBJECT, bytes(64), timeout=10, headers=headers)

    await asyncio.gather(*(worker(requests // 64) for _ in range(64)))
    await nc.close()


def one_round(url: str, mode: str, requests: int, headers: bool) -> float:
    responder = subprocess.Popen(
        [sys.executable, "-m", "bench.bus_path", "--respond", url, mode, str(requests)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert responder.stdout is not None and responder.stdout.readline().strip() == "ready"
    uvloop.run(send(url, requests, HEADERS if headers else None))
    return float(responder.communicate(timeout=60)[0].strip())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=40_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--respond", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.respond:
        url, mode, requests = args.respond
        print(uvloop.run(respond(url, mode, int(requests))), flush=True)
        return
    requests = args.requests // 64 * 64
    with tempfile.TemporaryDirectory(prefix="hetfaas-bench-") as tmp:
        port, work = free_port(), Path(tmp)
        server = start_nats(port, work / "data", work / "nats.conf", work / "nats.log")
        try:
            url = f"nats://127.0.0.1:{port}"
            print(
                f"responder µs CPU per request, median of {args.repeat} rounds of {requests} (64 in flight)"
            )
            print("\n| responder | no headers | with `traceparent` |\n|---|---|---|")
            for mode in MODES:
                cells = [
                    statistics.median(one_round(url, mode, requests, headers) for _ in range(args.repeat))
                    for headers in (False, True)
                ]
                print(f"| {mode} | {cells[0]:.1f} | {cells[1]:.1f} |")
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
