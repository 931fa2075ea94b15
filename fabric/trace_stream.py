"""Traces of a cluster of many machines: each service publishes its OTLP-JSON batches (the same
bytes it would append to a file) to `hetfaas.traces.<role>.<name>`, a JetStream stream keeps
them (bounded: size, age, copies as the bundle store's), and the CLI reads back the last
minutes of it for `hetfaas trace` and `hetfaas coldstarts`.

Publishing is core NATS, fire and forget, from the exporter's thread through the event loop: a
span costs the service what writing it to a file did, and spans are lost when the bus is (as
they are when a disk is full)."""

import asyncio
import datetime
import logging
from collections.abc import Callable

from nats import errors as nats_errors
from nats.js import JetStreamContext
from nats.js import errors as js_errors
from nats.js.api import ConsumerConfig, DeliverPolicy, DiscardPolicy, StreamConfig

from fabric.connection import Connection
from schemas.subjects import TRACES_ALL, TRACES_STREAM

log = logging.getLogger(__name__)

MAX_BYTES = 256 * 1024 * 1024  # the whole stream: older batches go first
MAX_AGE_S = 24 * 3600.0
MAX_BATCH_BYTES = 4 * 1024 * 1024  # a batch of 512 spans is ~0.5 MiB; NATS takes 8 MiB at most
READ_LIMIT_BYTES = MAX_BYTES  # what one read takes at most (the whole stream)


async def ensure(js: JetStreamContext, replicas: int) -> None:
    """The stream, made by the schedulers (the one role allowed to) if it is not there yet."""
    config = StreamConfig(
        name=TRACES_STREAM,
        subjects=[TRACES_ALL],
        max_bytes=MAX_BYTES,
        max_age=MAX_AGE_S,
        max_msg_size=MAX_BATCH_BYTES,
        discard=DiscardPolicy.OLD,
        num_replicas=replicas,
    )
    try:
        await js.stream_info(TRACES_STREAM)
    except js_errors.NotFoundError:
        await js.add_stream(config)
        log.info("made the trace stream %s (%d copies)", TRACES_STREAM, replicas)


async def keep(js: JetStreamContext, replicas: int, pause_s: float = 2.0) -> None:
    """`ensure`, tried again until it works: a cluster starting has no JetStream quorum yet."""
    while True:
        try:
            await ensure(js, replicas)
            return
        except (nats_errors.Error, TimeoutError) as exc:
            log.warning(
                "trace stream not made yet (%s); trying again in %.0f s", exc or type(exc).__name__, pause_s
            )
        await asyncio.sleep(pause_s)  # JetStream says nothing when it has a quorum


def writer(nc: Connection, loop: asyncio.AbstractEventLoop, subject: str) -> Callable[[bytes], None]:
    """A BatchExporter's write: hand the batch to the loop, which publishes it."""

    def write(body: bytes) -> None:
        if len(body) > MAX_BATCH_BYTES:
            raise ValueError(f"a batch of {len(body)} bytes is more than the trace stream takes")
        loop.call_soon_threadsafe(nc.publish_now, subject, body, "", None)

    return write


async def read(js: JetStreamContext, since_s: float, timeout_s: float = 1.0) -> list[bytes]:
    """Every batch published in the last `since_s` seconds, oldest first (at most
    READ_LIMIT_BYTES of them)."""
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=since_s)
    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start)
    try:
        if (await js.stream_info(TRACES_STREAM)).state.messages == 0:
            return []
        sub = await js.subscribe(TRACES_ALL, stream=TRACES_STREAM, ordered_consumer=True, config=config)
    except js_errors.NotFoundError:
        return []  # no scheduler has made it yet: no traces
    bodies: list[bytes] = []
    taken = 0
    try:
        while taken < READ_LIMIT_BYTES:
            try:
                msg = await sub.next_msg(timeout=timeout_s)
            except TimeoutError:
                break  # nothing (more) in the window
            bodies.append(msg.data)
            taken += len(msg.data)
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return bodies
