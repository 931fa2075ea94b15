"""What every kind of node does to be seen: a leased registration in etcd and heartbeats on NATS."""

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable

import nats
from nats.aio.client import Client as NATS

from fabric import bus
from fabric.store import LeasedKey, Store
from schemas import codec, keys, subjects
from schemas.errors import Error, ErrorCode
from schemas.messages import ErrorReply, Heartbeat, InvokeReply, NodeInvoke, NodeKind, NodeRecord

SCHEDULER_RETRIES = {"throttled", "unavailable"}  # refusals the scheduler retries on another node

log = logging.getLogger(__name__)


def register(
    stack: contextlib.AsyncExitStack, store: Store, node_id: str, kind: NodeKind, capacity: int, ttl_s: int
) -> LeasedKey:
    """The node's key under a lease (its `run()` keeps it alive); revoked when `stack` closes."""
    record = NodeRecord(
        node_id=node_id,
        kind=kind,
        hostname=socket.gethostname(),
        pid=os.getpid(),
        capacity=capacity,
        started_at=time.time(),
    )
    registration = store.leased_key(keys.node(node_id), lambda: codec.encode(record), ttl_s)
    stack.push_async_callback(registration.revoke)
    return registration


async def send_heartbeats(
    nc: NATS, node_id: str, beat: Callable[[int], Heartbeat], interval_s: float
) -> None:
    seq = 0
    while True:
        try:
            await nc.publish(subjects.heartbeat(node_id), codec.encode(beat(seq)))
        except nats.errors.Error as exc:  # e.g. mid-reconnect: the next beat will do
            log.warning("heartbeat %d not sent: %s", seq, exc)
        seq += 1
        await asyncio.sleep(interval_s)


def answer(req: NodeInvoke, reply: InvokeReply | ErrorReply) -> InvokeReply | ErrorReply | bus.ReplyTo:
    """Straight to the caller when the scheduler asked for it, except refusals it retries elsewhere."""
    if req.reply_to and not (isinstance(reply, ErrorReply) and reply.error.code in SCHEDULER_RETRIES):
        return bus.ReplyTo(req.reply_to, reply)
    return reply


def error_reply(
    req: NodeInvoke, node_id: str, code: ErrorCode, message: str, detail: str | None = None
) -> ErrorReply:
    return ErrorReply(
        error=Error(code=code, message=message, detail=detail), invocation_id=req.invocation_id, node=node_id
    )
