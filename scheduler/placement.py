"""Where an invocation runs. Pure: the view's nodes in, a node id (or None) out.

Simple on purpose (DESIGN.md §6's filter/score framework is a later issue): healthy host nodes
not yet tried for this request; among them prefer one with room, then the least loaded, where a
node holding a warm instance of this function's code counts as WARM_BONUS less loaded (so warm
wins unless it is clearly busier); ties go to the lowest node id, so repeated calls at low load
land on the same node and find its warm instance.
"""

from collections.abc import Iterable

from scheduler.view import NodeView

WARM_BONUS = 0.1  # a fraction of a node's capacity


def node_kind_for(runtime: str) -> str:
    """python and exec functions run on hosts; ebpf ones on DPUs (hosts gain a loader later)."""
    return "dpu" if runtime == "ebpf" else "host"


def choose_node(
    nodes: Iterable[NodeView],
    key: str,
    now: float,
    stale_after_s: float,
    exclude: set[str],
    kind: str = "host",
) -> NodeView | None:
    best: NodeView | None = None
    best_rank: tuple[bool, float, str] | None = None
    for node in nodes:
        if node.node_id in exclude or node.record.kind != kind or not node.healthy(now, stale_after_s):
            continue
        load = node.load()
        effective = load - WARM_BONUS if node.is_warm_for(key) else load
        rank = (load >= 1.0, effective, node.node_id)
        if best_rank is None or rank < best_rank:
            best, best_rank = node, rank
    return best
