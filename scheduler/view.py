"""The scheduler's cluster view: nodes (etcd membership + heartbeats) and functions. Pure.

The shell feeds it etcd watch events and heartbeats; placement reads it. Time is passed in.
"""

from dataclasses import dataclass, field

from schemas.messages import FunctionRecord, Heartbeat, NodeRecord, NodeStatus, instance_key


@dataclass
class NodeView:
    record: NodeRecord
    heartbeat: Heartbeat | None = None
    heartbeat_at: float | None = None
    unreachable: bool = False  # NATS said "no responders"; cleared by the next heartbeat
    inflight_here: int = 0  # this replica's requests on the node right now (fresher than heartbeats)
    # Functions this node ran since its last heartbeat: it probably holds a warm instance of them.
    recent: set[str] = field(default_factory=set)

    @property
    def node_id(self) -> str:
        return self.record.node_id

    def healthy(self, now: float, stale_after_s: float) -> bool:
        if self.unreachable or self.heartbeat_at is None:
            return False
        return now - self.heartbeat_at <= stale_after_s

    def load(self) -> float:
        reported = self.heartbeat.inflight if self.heartbeat else 0
        return max(reported, self.inflight_here) / max(self.record.capacity, 1)

    def is_warm_for(self, key: str) -> bool:
        if key in self.recent:
            return True
        return bool(self.heartbeat and self.heartbeat.warm_idle.get(key, 0) > 0)

    def status(self, now: float, stale_after_s: float) -> NodeStatus:
        hb = self.heartbeat
        return NodeStatus(
            node_id=self.node_id,
            kind=self.record.kind,
            hostname=self.record.hostname,
            healthy=self.healthy(now, stale_after_s),
            inflight=max(hb.inflight if hb else 0, self.inflight_here),
            capacity=self.record.capacity,
            instances=hb.instances if hb else 0,
            warm_idle=sum(hb.warm_idle.values()) if hb else 0,
            heartbeat_age_ms=None if self.heartbeat_at is None else round((now - self.heartbeat_at) * 1e3, 1),
            sandbox_mode=hb.sandbox_mode if hb else "",
            pool=hb.pool if hb else [],
            tenant_runs=hb.tenant_runs if hb else {},
        )


class ClusterView:
    def __init__(self) -> None:
        self.nodes: dict[str, NodeView] = {}
        self.functions: dict[tuple[str, str], FunctionRecord] = {}
        # Heartbeats of nodes whose registration we have not seen yet (etcd watch lags NATS).
        self._early_heartbeats: dict[str, tuple[Heartbeat, float]] = {}

    # --- membership (etcd) ---

    def put_node(self, record: NodeRecord) -> None:
        node = self.nodes.get(record.node_id)
        if node is None:
            node = self.nodes[record.node_id] = NodeView(record)
            early = self._early_heartbeats.pop(record.node_id, None)
            if early:
                node.heartbeat, node.heartbeat_at = early
        else:
            node.record = record

    def remove_node(self, node_id: str) -> None:
        self.nodes.pop(node_id, None)
        self._early_heartbeats.pop(node_id, None)

    def reset_nodes(self, records: list[NodeRecord]) -> list[str]:
        """Replace membership after a re-list; returns the ids that disappeared."""
        gone = [node_id for node_id in self.nodes if node_id not in {r.node_id for r in records}]
        for node_id in gone:
            self.remove_node(node_id)
        for record in records:
            self.put_node(record)
        return gone

    # --- load (NATS heartbeats) ---

    def on_heartbeat(self, hb: Heartbeat, now: float) -> None:
        node = self.nodes.get(hb.node_id)
        if node is None:
            self._early_heartbeats[hb.node_id] = (hb, now)
            return
        node.heartbeat, node.heartbeat_at = hb, now
        node.unreachable = False
        node.recent.clear()

    def stale_nodes(self, now: float, stale_after_s: float) -> list[str]:
        return [
            n.node_id
            for n in self.nodes.values()
            if n.heartbeat_at is not None and now - n.heartbeat_at > stale_after_s
        ]

    # --- functions (etcd) ---

    def put_function(self, record: FunctionRecord) -> None:
        self.functions[(record.spec.tenant, record.spec.name)] = record

    def remove_function(self, tenant: str, name: str) -> None:
        self.functions.pop((tenant, name), None)

    def reset_functions(self, records: list[FunctionRecord]) -> None:
        self.functions = {(r.spec.tenant, r.spec.name): r for r in records}

    def explain_no_node(self, now: float, stale_after_s: float) -> str:
        """Why placement found nothing, for the error message a user sees."""
        if not self.nodes:
            return "no host node is registered"
        reasons = []
        for node in sorted(self.nodes.values(), key=lambda n: n.node_id):
            if node.unreachable:
                reasons.append(f"{node.node_id} is not listening")
            elif node.heartbeat_at is None:
                reasons.append(f"{node.node_id} has sent no heartbeat yet")
            elif not node.healthy(now, stale_after_s):
                reasons.append(f"{node.node_id} missed heartbeats for {now - node.heartbeat_at:.1f}s")
        return "; ".join(reasons) or "every healthy node was tried"

    def has_tenant(self, tenant: str) -> bool:
        return any(t == tenant for t, _ in self.functions)


def warm_key(record: FunctionRecord) -> str:
    return instance_key(record.spec.tenant, record.spec.name, record.bundle_digest)
