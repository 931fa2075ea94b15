"""Placement and the cluster view, table-driven over built nodes."""

import pytest

from scheduler.placement import choose_node
from scheduler.view import ClusterView, NodeView
from schemas.messages import Heartbeat, NodeRecord

NOW = 100.0
STALE_S = 3.0
KEY = "acme/fn@sha256-a"


def node(
    node_id: str,
    inflight: int = 0,
    capacity: int = 10,
    warm: int = 0,
    age_s: float | None = 0.5,
    kind: str = "host",
    unreachable: bool = False,
    recent: bool = False,
) -> NodeView:
    record = NodeRecord(node_id=node_id, kind=kind, hostname="h", pid=1, capacity=capacity, started_at=0)
    view = NodeView(record, unreachable=unreachable)
    if age_s is not None:
        view.heartbeat = Heartbeat(
            node_id=node_id,
            seq=1,
            inflight=inflight,
            capacity=capacity,
            instances=warm,
            warm_idle={KEY: warm} if warm else {},
        )
        view.heartbeat_at = NOW - age_s
    if recent:
        view.recent.add(KEY)
    return view


@pytest.mark.parametrize(
    ("nodes", "exclude", "expected"),
    [
        ([], set(), None),
        ([node("a"), node("b")], set(), "a"),  # tie: lowest id
        ([node("a", inflight=5), node("b", inflight=1)], set(), "b"),  # least loaded
        ([node("a", inflight=1), node("b", inflight=1, warm=1)], set(), "b"),  # warm wins a tie
        ([node("a", inflight=0), node("b", inflight=1, warm=1)], set(), "a"),  # 10% more load beats warmth
        ([node("a"), node("b", inflight=0, recent=True)], set(), "b"),  # ran it since its last heartbeat
        ([node("a", inflight=10, warm=1), node("b", inflight=9)], set(), "b"),  # a is full
        ([node("a", inflight=12), node("b", inflight=10)], set(), "b"),  # all full: least overloaded
        ([node("a", age_s=5.0), node("b", inflight=9)], set(), "b"),  # a stopped heartbeating
        ([node("a", age_s=None), node("b", inflight=9)], set(), "b"),  # a never heartbeated
        ([node("a", unreachable=True), node("b", inflight=9)], set(), "b"),
        ([node("a"), node("b", inflight=9)], {"a"}, "b"),  # already tried for this request
        ([node("a")], {"a"}, None),
        ([node("d", kind="dpu"), node("b", inflight=9)], set(), "b"),  # python/exec run on hosts
    ],
)
def test_choose_node(nodes: list[NodeView], exclude: set[str], expected: str | None) -> None:
    chosen = choose_node(nodes, KEY, NOW, STALE_S, exclude)
    assert (chosen.node_id if chosen else None) == expected


def test_local_inflight_counts_before_the_next_heartbeat() -> None:
    a, b = node("a"), node("b")
    a.inflight_here = 3
    assert choose_node([a, b], KEY, NOW, STALE_S, set()).node_id == "b"


def record(node_id: str) -> NodeRecord:
    return NodeRecord(node_id=node_id, kind="host", hostname="h", pid=1, capacity=4, started_at=0)


def beat(node_id: str, seq: int = 1) -> Heartbeat:
    return Heartbeat(node_id=node_id, seq=seq, inflight=0, capacity=4, instances=0)


def test_heartbeat_before_registration_is_kept() -> None:
    view = ClusterView()
    view.on_heartbeat(beat("a"), now=10.0)
    view.put_node(record("a"))
    assert view.nodes["a"].healthy(10.5, STALE_S)


def test_heartbeat_clears_unreachable_and_recent() -> None:
    view = ClusterView()
    view.put_node(record("a"))
    view.nodes["a"].unreachable = True
    view.nodes["a"].recent.add(KEY)
    view.on_heartbeat(beat("a"), now=1.0)
    assert view.nodes["a"].healthy(1.0, STALE_S) and not view.nodes["a"].recent


def test_a_restarted_node_is_healthy_again() -> None:
    view = ClusterView()
    view.put_node(record("a"))
    view.on_heartbeat(beat("a", seq=500), now=1.0)
    view.on_heartbeat(beat("a", seq=0), now=5.0)
    view.on_heartbeat(beat("a", seq=1), now=8.0)
    assert view.nodes["a"].healthy(9.0, STALE_S)


def test_stale_nodes_and_reset() -> None:
    view = ClusterView()
    for node_id in "abc":
        view.put_node(record(node_id))
    view.on_heartbeat(beat("a"), now=1.0)
    view.on_heartbeat(beat("b"), now=9.0)
    assert view.stale_nodes(10.0, STALE_S) == ["a"]
    assert view.reset_nodes([record("b")]) == ["a", "c"]
    assert list(view.nodes) == ["b"]


def test_explain_no_node() -> None:
    view = ClusterView()
    assert view.explain_no_node(0, STALE_S) == "no host node is registered"
    view.put_node(record("a"))
    view.put_node(record("b"))
    view.on_heartbeat(beat("b"), now=1.0)
    assert view.explain_no_node(10.0, STALE_S) == "a has sent no heartbeat yet; b missed heartbeats for 9.0s"
