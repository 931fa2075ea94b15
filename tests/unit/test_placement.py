"""Placement: every filter and score plugin, the framework, the snapshot and the view, table-driven
over nodes and requests made by the builders below."""

from collections import Counter

import pytest

from scheduler import framework, plugins
from scheduler.framework import Cycle, Fit, Placed, Request, Unplaced
from scheduler.invoke import Explanation
from scheduler.settings import PlacementSettings
from scheduler.snapshot import NO_POOL, NodeInfo, Snapshot, build, node_info
from scheduler.view import MAX_EARLY_HEARTBEATS, ClusterView
from schemas.messages import Heartbeat, NodeRecord, Partition, PoolShard, TenantUsage

NOW = 100.0
STALE_S = 3.0
KEY = "acme/fn@sha256-a"
PROG = "acme/pkt@sha256-p"
FULL = frozenset({"are full"})
PART = Partition(concurrency=2, programs=2, map_memory_bytes=1000)


def host(node_id: str, inflight: int = 0, capacity: int = 10, warm: bool = False, **kw) -> NodeInfo:
    return NodeInfo(node_id, "host", capacity, inflight, frozenset({KEY} if warm else ()), **kw)


def dpu(node_id: str, loaded: bool = False, tenant: TenantUsage | None = None, **kw) -> NodeInfo:
    tenants = {"acme": tenant} if tenant else {}
    warm = frozenset({PROG} if loaded else ())
    return NodeInfo(node_id, "dpu", 8, 0, warm, runs_ebpf=True, partition=PART, tenants=tenants, **kw)


def python_fn(**kw) -> Request:
    return Request(key=KEY, tenant="acme", runtime="python", placement="host", **kw)


def ebpf_fn(placement: str = "dpu", **kw) -> Request:
    return Request(key=PROG, tenant="acme", runtime="ebpf", placement=placement, **kw)


def cycle(
    nodes: list[NodeInfo],
    held: dict[str, int] | None = None,
    replicas: int = 1,
    instances: dict[tuple[str, str], int] | None = None,
) -> Cycle:
    snap = build(nodes, NOW)
    return Cycle(snap, Counter(held or {}), Counter(instances or {}), lambda total, _: total // replicas, "a")


def usage(running: int = 0, programs: int = 0, map_bytes: int = 0) -> TenantUsage:
    return TenantUsage(running=running, programs=programs, map_memory_bytes=map_bytes)


# --- filters ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plugin", "req", "node", "held", "fit"),
    [
        ("runtime", python_fn(), host("a"), {}, Fit.YES),
        ("runtime", python_fn(), dpu("a"), {}, Fit.NEVER),
        ("runtime", ebpf_fn(), dpu("a"), {}, Fit.YES),
        ("runtime", ebpf_fn(), host("a"), {}, Fit.NEVER),  # a host without trusted keys
        ("runtime", ebpf_fn(), host("a", runs_ebpf=True), {}, Fit.YES),
        ("not_tried", python_fn(exclude=frozenset({"a"})), host("a"), {}, Fit.NEVER),
        ("not_tried", python_fn(exclude=frozenset({"b"})), host("a"), {}, Fit.YES),
        ("capacity", python_fn(), host("a", capacity=2), {"a": 1}, Fit.YES),
        ("capacity", python_fn(), host("a", capacity=2), {"a": 2}, Fit.NOT_NOW),
        ("capacity", python_fn(), host("a", capacity=0), {}, Fit.NEVER),
        # the node's own report is a heartbeat old: this replica's count decides
        ("capacity", python_fn(), host("a", inflight=10, capacity=10), {}, Fit.YES),
        ("memory", python_fn(memory_mb=256), host("a"), {}, Fit.YES),  # memory not accounted
        ("memory", python_fn(memory_mb=256), host("a", memory_mb=200), {}, Fit.NEVER),
        ("memory", python_fn(memory_mb=256), host("a", memory_mb=1000, memory_used_mb=800), {}, Fit.NOT_NOW),
        (
            "memory",
            python_fn(memory_mb=256),
            host("a", warm=True, memory_mb=1000, memory_used_mb=800),
            {},
            Fit.YES,
        ),
        ("memory", python_fn(memory_mb=256), host("a", memory_mb=1000, memory_used_mb=744), {}, Fit.YES),
        ("tenant_partition", python_fn(), host("a"), {}, Fit.YES),
        ("tenant_partition", ebpf_fn(), dpu("a"), {}, Fit.YES),  # a tenant new to the node
        ("tenant_partition", ebpf_fn(map_memory_bytes=2000), dpu("a"), {}, Fit.NEVER),
        ("tenant_partition", ebpf_fn(), dpu("a", tenant=usage(running=2)), {}, Fit.NOT_NOW),
        ("tenant_partition", ebpf_fn(), dpu("a", tenant=usage(programs=2)), {}, Fit.NEVER),
        ("tenant_partition", ebpf_fn(), dpu("a", loaded=True, tenant=usage(programs=2)), {}, Fit.YES),
        ("tenant_partition", ebpf_fn(map_memory_bytes=500), dpu("a", tenant=usage(1, 1, 600)), {}, Fit.NEVER),
        ("tenant_partition", ebpf_fn(map_memory_bytes=400), dpu("a", tenant=usage(1, 1, 600)), {}, Fit.YES),
    ],
)
def test_filter(plugin: str, req: Request, node: NodeInfo, held: dict[str, int], fit: Fit) -> None:
    status = plugins.FILTERS[plugin](req, node, cycle([node], held))
    assert status.fit is fit, status.reason
    assert bool(status.reason) == (fit is not Fit.YES), "a refusal says why"


def test_instances_score_the_room_left_for_this_function_on_this_node() -> None:
    node = host("a")
    busy = cycle([node], instances={("a", KEY): 2, ("a", "other@x"): 9})
    assert plugins.instances(python_fn(instances=8), node, busy) == 100  # room
    assert plugins.instances(python_fn(instances=2), node, busy) == 50  # the next call would queue
    assert plugins.instances(python_fn(instances=1), node, busy) == 25  # one queued already
    assert plugins.instances(python_fn(), node, busy) == 100  # no cap (exec, ebpf)


def test_capacity_counts_only_this_replicas_share() -> None:
    node = host("a", capacity=10)
    assert plugins.capacity(python_fn(), node, cycle([node], {"a": 4}, replicas=2)).fit is Fit.YES
    assert plugins.capacity(python_fn(), node, cycle([node], {"a": 5}, replicas=2)).fit is Fit.NOT_NOW


# --- scores -------------------------------------------------------------------------------------


def pool(free: int, prewarmed: int = 0) -> list[PoolShard]:
    return [
        PoolShard(
            shard=0,
            mode="prewarm",
            free=free,
            prewarmed=prewarmed,
            busy=0,
            recycling=0,
            created=0,
            recycled=0,
            vanished=0,
            inline=0,
            refilling=False,
        )
    ]


@pytest.mark.parametrize(
    ("name", "node", "others", "expected"),
    [
        ("warm", host("a", warm=True), [], 100),
        ("warm", host("a"), [], 0),
        ("warm", dpu("a", loaded=True), [], 0),  # a python key is not this program
        ("free_slots", host("a", free_slots=0), [], 0),
        ("free_slots", host("a", free_slots=2), [], 50),
        ("free_slots", host("a", free_slots=9), [], 100),
        ("free_slots", host("a", free_slots=NO_POOL), [], 50),
        ("home", host("a"), [], 100),
        ("home", host("b"), [], 0),
        # low cluster load: pack (the busier node scores higher, up to half full)
        ("load", host("a", inflight=3), [host("z", inflight=0)], 30),
        ("load", host("a", inflight=0), [host("z", inflight=3)], 0),
        ("load", host("a", inflight=8), [host("z", inflight=0, capacity=30)], 20),  # past half: spread
        # high cluster load: spread
        ("load", host("a", inflight=6), [host("z", inflight=9)], 40),
        ("load", host("a", inflight=9), [host("z", inflight=6)], 10),
    ],
)
def test_score(name: str, node: NodeInfo, others: list[NodeInfo], expected: float) -> None:
    score = plugins.SCORES[name]
    assert score(python_fn(), node, cycle([node, *others])) == pytest.approx(expected)


def test_warm_scores_a_loaded_program_for_ebpf() -> None:
    assert plugins.warm(ebpf_fn(), dpu("a", loaded=True), cycle([])) == 100


def test_load_counts_this_replicas_fresher_count() -> None:
    node = host("a", inflight=0)
    spread = cycle([node, host("z", inflight=10)], held={"a": 5})
    assert plugins.load(python_fn(), node, spread) == pytest.approx(50)


# --- framework ----------------------------------------------------------------------------------

PROFILE = plugins.profile(PlacementSettings())


def place(req: Request, nodes: list[NodeInfo], held: dict[str, int] | None = None) -> Placed | Unplaced:
    c = cycle(nodes, held)
    return framework.place(req, c.snapshot, PROFILE, c)


def home_of(key: str, ids: list[str]) -> str:
    return sorted(ids)[framework.home_index(key, len(ids))]


def test_repeated_calls_go_home_at_low_load() -> None:
    nodes = [host(f"n{i}") for i in range(7)]
    chosen = {place(python_fn(salt=salt), nodes).node_id for salt in range(50)}
    assert chosen == {home_of(KEY, [n.node_id for n in nodes])}


def test_a_warm_instance_beats_the_home_node() -> None:
    nodes = [host(f"n{i}") for i in range(7)]
    home = home_of(KEY, [n.node_id for n in nodes])
    warm_one = next(n for n in nodes if n.node_id != home)
    nodes = [host(n.node_id, warm=n is warm_one) for n in nodes]
    assert place(python_fn(), nodes).node_id == warm_one.node_id


def test_a_full_home_sends_the_call_to_its_successor_or_the_random_pick() -> None:
    nodes = [host(f"n{i}", capacity=2) for i in range(5)]
    home = home_of(KEY, [n.node_id for n in nodes])
    decision = place(python_fn(), nodes, held={home: 2})
    assert isinstance(decision, Placed) and decision.node_id != home


def test_power_of_two_choices_spreads_at_high_load() -> None:
    """Above the pack threshold the less loaded of the two candidates wins, whatever home says."""
    nodes = [host(f"n{i}", inflight=8) for i in range(6)] + [host("idle", inflight=0)]
    wins = Counter(place(python_fn(salt=salt), nodes).node_id for salt in range(200))
    assert wins["idle"] > 30, wins  # picked whenever it is one of the two choices


@pytest.mark.parametrize(
    ("req", "nodes", "held", "expected"),
    [
        (python_fn(), [], {}, Unplaced(wait=False)),
        (python_fn(), [dpu("d")], {}, Unplaced(wait=False)),  # no host at all
        (python_fn(), [host("a", capacity=1)], {"a": 1}, Unplaced(True, {"are full": 1}, busy=FULL)),
        (
            python_fn(exclude=frozenset({"a"})),
            [host("a"), host("b", capacity=1)],
            {"b": 1},
            Unplaced(True, {"already tried for this invocation": 1, "are full": 1}, busy=FULL),
        ),
        (
            python_fn(exclude=frozenset({"a"})),
            [host("a")],
            {},
            Unplaced(False, {"already tried for this invocation": 1}),
        ),
        (ebpf_fn(), [host("h", runs_ebpf=True)], {}, Unplaced(False, kinds=("dpu",))),  # never a host
        (
            ebpf_fn(),
            [dpu("d", tenant=usage(programs=2))],
            {},
            Unplaced(False, {"have the tenant's program slots used up": 1}, ("dpu",)),
        ),
    ],
)
def test_unplaced(req: Request, nodes: list[NodeInfo], held: dict[str, int], expected: Unplaced) -> None:
    assert place(req, nodes, held) == expected


def test_ebpf_prefers_a_dpu_with_the_program_loaded() -> None:
    nodes = [dpu(f"d{i}") for i in range(5)] + [dpu("dl", loaded=True)]
    assert place(ebpf_fn(), nodes).node_id == "dl"


def test_ebpf_any_falls_back_to_an_ebpf_host_only_when_no_dpu_has_room() -> None:
    full = dpu("d", tenant=usage(programs=2))
    ebpf_host = host("h", runs_ebpf=True, partition=PART)
    assert place(ebpf_fn("any"), [dpu("d2"), ebpf_host]).node_id == "d2"
    assert place(ebpf_fn("any"), [full, ebpf_host, host("plain")]).node_id == "h"
    assert place(ebpf_fn("dpu"), [full, ebpf_host]) == Unplaced(
        False, {"have the tenant's program slots used up": 1}, ("dpu",)
    )


def test_ties_break_the_same_way_every_time() -> None:
    nodes = [host(f"n{i}") for i in range(4)]
    first = place(python_fn(salt=7), nodes)
    assert all(place(python_fn(salt=7), list(reversed(nodes))) == first for _ in range(5))


def test_a_decision_reads_a_bounded_number_of_nodes() -> None:
    nodes = [host(f"n{i:05d}") for i in range(5000)]
    decision = place(python_fn(salt=12345), nodes)
    assert isinstance(decision, Placed) and decision.considered <= 4


def test_explain_counts_nodes_by_reason() -> None:
    unplaced = Unplaced(wait=True, reasons={"are full": 3, "cannot load eBPF": 2})
    assert unplaced.explain(5) == "0/5 nodes can run it: 3 are full, 2 cannot load eBPF"
    assert Unplaced(False, kinds=("dpu", "host")).explain(0) == "no healthy dpu or host node"


@pytest.mark.parametrize("size", [1, 2, 3, 7, 10, 12, 97])
def test_a_full_cluster_is_walked_once_per_node(size: int) -> None:
    """Every key's walk (its home and co-prime step) reaches each node exactly once."""
    nodes = [host(f"n{i}", capacity=1) for i in range(size)]
    full = {n.node_id: 1 for n in nodes}
    for k in range(5):
        req = Request(key=f"acme/f{k}@x", tenant="acme", runtime="python", placement="host", salt=k * 7919)
        assert place(req, nodes, full) == Unplaced(True, {"are full": size}, busy=FULL)


def test_unknown_plugins_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"filter 'gpu'.*score 'cheap'"):
        plugins.profile(PlacementSettings(filters=["gpu"], weights={"cheap": 1}))


def test_required_filters_cannot_be_switched_off() -> None:
    profile = plugins.profile(PlacementSettings(filters=["capacity"]))
    assert [name for name, _ in profile.filters] == ["runtime", "not_tried", "capacity"]


def test_a_zero_weight_disables_a_score() -> None:
    profile = plugins.profile(PlacementSettings(weights={"warm": 1, "home": 0}))
    assert [name for name, _, _ in profile.scores] == ["warm"]


# --- snapshot and view --------------------------------------------------------------------------


def test_snapshot_indexes_warm_nodes_and_load_per_kind() -> None:
    snap: Snapshot = build([host("b", inflight=5, warm=True), host("a", inflight=1), dpu("d")], NOW)
    assert [n.node_id for n in snap.rings["host"]] == ["a", "b"]
    assert snap.warm_index[KEY] == ("b",)
    assert snap.utilisation["host"] == pytest.approx(6 / 20)


def test_node_info_from_a_heartbeat() -> None:
    rec = NodeRecord(node_id="a", kind="host", hostname="h", pid=1, capacity=4, started_at=0, memory_mb=512)
    hb = Heartbeat(
        node_id="a",
        seq=1,
        inflight=2,
        capacity=4,
        instances=1,
        warm_idle={KEY: 1, "x": 0},
        pool=pool(free=2, prewarmed=1),
        memory_used_mb=128,
    )
    info = node_info(rec, hb, recent={"y"})
    assert info.warm == {KEY, "y"} and info.free_slots == 3 and info.memory_used_mb == 128


def test_the_view_snapshot_is_rebuilt_only_when_changed() -> None:
    view = ClusterView()
    view.put_node(record("a"))
    view.on_heartbeat(beat("a"), now=NOW)
    first = view.snapshot(NOW, STALE_S, refresh_s=0.02)
    assert view.snapshot(NOW + 0.01, STALE_S, refresh_s=0.02) is first
    view.ran("a", KEY)
    assert view.snapshot(NOW + 0.01, STALE_S, refresh_s=0.02) is first  # changed, but too soon
    second = view.snapshot(NOW + 0.03, STALE_S, refresh_s=0.02)
    assert second is not first and KEY in second.nodes["a"].warm
    assert "a" not in view.snapshot(NOW + 5, STALE_S, refresh_s=0.02).nodes  # stopped heartbeating


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


def test_a_free_instance_slot_beats_queueing_behind_a_warm_node() -> None:
    nodes = [host("a", warm=True, capacity=64), host("b", capacity=64)]
    room = cycle(nodes, held={"a": 7}, instances={("a", KEY): 7})
    assert framework.place(python_fn(instances=8), room.snapshot, PROFILE, room).node_id == "a"
    full = cycle(nodes, held={"a": 8}, instances={("a", KEY): 8})
    assert framework.place(python_fn(instances=8), full.snapshot, PROFILE, full).node_id == "b"


def test_when_every_node_is_full_the_shorter_queue_wins() -> None:
    nodes = [host("a", warm=True, capacity=64), host("b", warm=True, capacity=64)]
    c = cycle(nodes, held={"a": 20, "b": 12}, instances={("a", KEY): 20, ("b", KEY): 12})
    assert framework.place(python_fn(instances=8), c.snapshot, PROFILE, c).node_id == "b"


def test_the_explanation_is_written_out_only_when_asked() -> None:
    """The attempt's span carries it; the exporter turns it into text, off the invoke path."""
    placed = Placed("a", "host", 500.0, {"load": 37.5, "warm": 100.0}, 2)
    assert str(Explanation(placed)) == "load 38, warm 100 (of 2 looked at)"
    assert str(Explanation(Placed("a", "host", 0.0, {}, 1))) == "", "decided without explaining"


def test_heartbeats_of_unregistered_nodes_are_bounded_and_the_newest_kept() -> None:
    view = ClusterView()
    for i in range(MAX_EARLY_HEARTBEATS * 10):
        view.on_heartbeat(Heartbeat(node_id=f"n{i}", seq=0, inflight=0, capacity=1, instances=0), float(i))
    assert len(view._early_heartbeats) == MAX_EARLY_HEARTBEATS
    last = f"n{MAX_EARLY_HEARTBEATS * 10 - 1}"
    view.put_node(NodeRecord(node_id=last, kind="host", hostname="h", pid=1, capacity=1, started_at=0))
    assert view.nodes[last].heartbeat is not None, "a node registering just after its beat keeps it"
    assert "n0" not in view._early_heartbeats
