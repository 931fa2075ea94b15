"""The immutable cluster snapshot placement decides over. Pure.

Built from the view (etcd membership + NATS heartbeats) when it has changed, at most every
`refresh_ms`: a decision reads plain tuples and frozensets, never the mutable view, so what it
sees cannot change under it (the Kubernetes scheduler's per-cycle snapshot).
"""

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from schemas.messages import Heartbeat, NodeRecord, Partition, TenantUsage

NO_POOL = -1  # the node reports no sandbox pool (plain mode, or a DPU)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    kind: str
    capacity: int
    inflight: int  # as the node last reported it
    warm: frozenset[str] = frozenset()  # instance keys with an idle instance or a loaded program
    free_slots: int = NO_POOL  # sandbox slots ready now (free + prewarmed)
    memory_mb: int = 0  # 0: the node does not account memory
    memory_used_mb: int = 0
    runs_ebpf: bool = False
    partition: Partition | None = None
    tenants: Mapping[str, TenantUsage] = field(default_factory=dict)
    trusted_keys: frozenset[str] = frozenset()  # the verifier keys whose programs it loads


@dataclass(frozen=True)
class Snapshot:
    nodes: Mapping[str, NodeInfo]
    rings: Mapping[str, tuple[NodeInfo, ...]]  # per kind, sorted by id: the ring home nodes hash onto
    warm_index: Mapping[str, tuple[str, ...]]  # instance key -> ids of nodes holding it warm
    utilisation: Mapping[str, float]  # per kind: in flight / capacity over the healthy nodes
    built_at: float
    capacity: int = 0  # invocations the healthy nodes run at once, all kinds together

    @property
    def size(self) -> int:
        return len(self.nodes)


def node_info(record: NodeRecord, hb: Heartbeat | None, recent: Iterable[str] = ()) -> NodeInfo:
    """One node as placement sees it; `recent`: keys it ran since its last heartbeat (so it
    probably holds them warm, though its heartbeat cannot say so yet)."""
    if hb is None:
        return NodeInfo(record.node_id, record.kind, record.capacity, 0, frozenset(recent))
    pool = hb.pool
    return NodeInfo(
        node_id=record.node_id,
        kind=record.kind,
        capacity=record.capacity,
        inflight=hb.inflight,
        warm=frozenset(k for k, idle in hb.warm_idle.items() if idle > 0).union(recent),
        free_slots=sum(s.free + s.prewarmed for s in pool) if pool else NO_POOL,
        memory_mb=record.memory_mb,
        memory_used_mb=hb.memory_used_mb,
        runs_ebpf=record.runs_ebpf,
        partition=record.partition,
        tenants=hb.tenants,
        trusted_keys=frozenset(record.trusted_keys),
    )


def build(nodes: Iterable[NodeInfo], built_at: float) -> Snapshot:
    by_id = {n.node_id: n for n in nodes}
    rings: defaultdict[str, list[NodeInfo]] = defaultdict(list)
    warm: defaultdict[str, list[str]] = defaultdict(list)
    load: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0])
    for node_id in sorted(by_id):
        node = by_id[node_id]
        rings[node.kind].append(node)
        for key in node.warm:
            warm[key].append(node_id)
        load[node.kind][0] += node.inflight
        load[node.kind][1] += node.capacity
    return Snapshot(
        nodes=MappingProxyType(by_id),
        rings=MappingProxyType({kind: tuple(ring) for kind, ring in rings.items()}),
        warm_index=MappingProxyType({key: tuple(ids) for key, ids in warm.items()}),
        utilisation=MappingProxyType({k: used / max(cap, 1) for k, (used, cap) in load.items()}),
        built_at=built_at,
        capacity=sum(cap for _, cap in load.values()),
    )
