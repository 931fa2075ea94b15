"""`hetfaas describe NAME`: a function's record, where it is warm, and its recent invocations,
gathered from the replica's view, etcd and every healthy node that may have run it."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fabric.store import STORE_ERRORS, Store
from scheduler import state
from scheduler.view import ClusterView
from schemas import codec, subjects
from schemas.messages import (
    DescribeReply,
    DescribeRequest,
    ErrorReply,
    FunctionRecord,
    RecentReply,
    RecentRequest,
    function_of,
)

AskNode = Callable[[str, Any, str, Any], Awaitable[Any]]  # Control._ask_node
MAX_RECENT = 50  # invocations shown, newest first, of all the nodes' together


async def describe(
    req: DescribeRequest,
    record: FunctionRecord,
    view: ClusterView,
    store: Store,
    nodes: list[str],
    ask_node: AskNode,
) -> DescribeReply | ErrorReply:
    """`nodes`: the healthy nodes of a kind that runs the function, each asked what it ran."""
    try:
        revision = await state.function_revision(store, req.tenant, req.function)
    except STORE_ERRORS:
        revision = 0
    question = RecentRequest(tenant=req.tenant, function=req.function)
    replies = await asyncio.gather(
        *(ask_node(subjects.node_recent(node), question, node, codec.recent_result) for node in nodes)
    )
    recent = [entry for reply in replies if isinstance(reply, RecentReply) for entry in reply.invocations]
    recent.sort(key=lambda entry: entry.at, reverse=True)
    unanswered = [
        node for node, reply in zip(nodes, replies, strict=True) if not isinstance(reply, RecentReply)
    ]
    return DescribeReply(
        function=record,
        revision=revision,
        warm=warm_nodes(view, f"{req.tenant}/{req.function}"),
        recent=recent[:MAX_RECENT],
        unanswered=unanswered,
    )


def warm_nodes(view: ClusterView, function: str) -> dict[str, int]:
    """Node id -> its idle instances of the function (any code of it), from the last heartbeats."""
    warm: dict[str, int] = {}
    for node in view.nodes.values():
        beat = node.heartbeat
        if beat is None:
            continue
        idle = sum(count for key, count in beat.warm_idle.items() if function_of(key) == function)
        if idle:
            warm[node.node_id] = idle
    return warm
