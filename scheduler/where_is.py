"""Finding an invocation sent before: a caller that heard nothing sends it again, and its first
scheduler may have died after forwarding it. Every node says whether it holds it (`where-is`)."""

import asyncio
import logging
import time
from collections.abc import Collection
from functools import partial

import msgspec

from fabric import bus
from fabric.connection import STATUS, Connection
from scheduler.view import ClusterView
from schemas import codec, subjects
from schemas.messages import WhereIs

log = logging.getLogger(__name__)

# How a replica names itself answering where-is: a caller's copy that reaches another replica
# while this one still has the first (queued for room, say) must not be placed a second time.
REPLICA_PREFIX = "scheduler:"
# The answer when a node the view holds healthy said nothing: it may have the invocation (a node
# reconnecting to NATS hears no where-is), so the copy must not be placed elsewhere. Measured:
# 3 of 34 657 calls ran twice when silence counted as "no" (bench/failover.py).
SILENT = "?silent"


async def where_is(
    nc: Connection,
    view: ClusterView,
    asked: WhereIs,
    attempt: int,
    stale_after_s: float,
    timeout_s: float,
    replicas: Collection[str] = (),
) -> str | None:
    """The caller sent this invocation before and heard nothing: its first scheduler may have
    died after forwarding it. Every node says whether it has it; the one that has it gets it
    again and answers from the running (or finished) invocation instead of running it twice.
    The wait ends at the first yes, once every node the view holds healthy has said no, or
    after `timeout_s` (a node that died with it says nothing). The other live `replicas` answer
    too (as `scheduler:<id>`): one may still hold the first copy, before any node has it."""
    now = time.monotonic()
    asking = {node_id for node_id, node in view.nodes.items() if node.healthy(now, stale_after_s)}
    asking.update(replicas)
    if not asking:
        return None
    found: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
    inbox = nc.new_inbox()
    sub = await nc.subscribe_inline(inbox, partial(_count_answer, found, asking))
    try:
        await nc.publish(subjects.WHERE_IS, codec.encode(asked), reply=inbox)
        async with asyncio.timeout(timeout_s):
            node = await found
    except TimeoutError:
        log.warning("invocation %s: %s never said whether they have it", asked.invocation_id, asking)
        return SILENT if any(not a.startswith(REPLICA_PREFIX) for a in asking) else None
    finally:
        await sub.unsubscribe()
    if node is not None:
        log.info("invocation %s (attempt %d) is already on %s", asked.invocation_id, attempt, node)
    return node


def _count_answer(
    found: "asyncio.Future[str | None]",
    asking: set[str],
    subject: str,
    reply: str,
    data: bytes,
    headers: dict[str, str] | None,
) -> None:
    """One node's answer to `where-is`: the first yes settles it; so does the last no."""
    if found.done():
        return
    if headers and headers.get(STATUS) == bus.NO_RESPONDERS_STATUS:
        found.set_result(None)  # no node listens at all
        return
    try:
        answer = codec.have_it.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("malformed where-is answer: %s", exc)
        return
    if answer.has and (answer.node_id in asking or not answer.node_id.startswith(REPLICA_PREFIX)):
        found.set_result(answer.node_id)  # (a replica's own answer, handling this copy, is not asked)
        return
    asking.discard(answer.node_id)
    if not asking:
        found.set_result(None)
