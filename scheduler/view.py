"""The scheduler's cluster view: nodes (etcd membership + heartbeats) and functions. Pure.

The shell feeds it etcd watch events and heartbeats; placement reads immutable snapshots of it
(`snapshot()`). Time is passed in.
"""

from collections import OrderedDict
from dataclasses import dataclass, field

from scheduler import snapshot
from scheduler.admission import decrement, increment
from schemas.messages import FunctionRecord, Heartbeat, NodeRecord, NodeStatus, instance_key

FULL_REBUILD_S = 0.25  # rebuild at least this often even unchanged: nodes go stale with time


@dataclass
class NodeView:
    record: NodeRecord
    heartbeat: Heartbeat | None = None
    heartbeat_at: float | None = None
    unreachable: bool = False  # NATS said "no responders"; cleared by the next heartbeat
    # Functions this node ran since its last heartbeat: it probably holds a warm instance of them.
    recent: set[str] = field(default_factory=set)

    @property
    def node_id(self) -> str:
        return self.record.node_id

    def healthy(self, now: float, stale_after_s: float) -> bool:
        if self.unreachable or self.heartbeat_at is None:
            return False
        return now - self.heartbeat_at <= stale_after_s

    def status(self, now: float, stale_after_s: float, held: int) -> NodeStatus:
        hb = self.heartbeat
        return NodeStatus(
            node_id=self.node_id,
            kind=self.record.kind,
            hostname=self.record.hostname,
            healthy=self.healthy(now, stale_after_s),
            inflight=max(hb.inflight if hb else 0, held),
            capacity=self.record.capacity,
            instances=hb.instances if hb else 0,
            warm_idle=sum(hb.warm_idle.values()) if hb else 0,
            heartbeat_age_ms=None if self.heartbeat_at is None else round((now - self.heartbeat_at) * 1e3, 1),
            version=self.record.version,
            sandbox_mode=hb.sandbox_mode if hb else "",
            pool=hb.pool if hb else [],
            tenant_runs=hb.tenant_runs if hb else {},
            stem_cells=hb.stem_cells if hb else 0,
            templates=hb.templates if hb else 0,
        )


# Heartbeats kept for nodes not registered yet: a registration follows its first beat within a
# watch event, so this holds only nodes starting at once; a flood of unknown ids (300 000 grew
# a replica by 346 MB when this was unbounded) evicts the oldest.
MAX_EARLY_HEARTBEATS = 256
MAX_REMOVED_REMEMBERED = 4096  # removed deployments remembered for invocations still queued


class ClusterView:
    def __init__(self) -> None:
        self.nodes: dict[str, NodeView] = {}
        self.cordoned: frozenset[str] = frozenset()  # drained by an operator: placed on no more
        self.functions: dict[tuple[str, str], FunctionRecord] = {}
        # deployments removed lately (tenant, name, deployed_at): invocations still queued for
        # one are answered not_found, not run (invoke.removed_meanwhile)
        self.removed_deployments: OrderedDict[tuple[str, str, float], None] = OrderedDict()
        # Heartbeats of nodes not registered now: not seen yet (etcd's watch lags NATS), or
        # whose registration lapsed (`remove_node`).
        self._early_heartbeats: dict[str, tuple[Heartbeat, float]] = {}
        # This replica's invocations on each node right now (`reserve`, `unreserve`); read-only
        # to everyone else.
        self.held: dict[str, int] = {}
        self.held_instances: dict[tuple[str, str], int] = {}  # per (node id, function key)
        self._snapshot: snapshot.Snapshot | None = None
        self._changed = True

    def snapshot(self, now: float, stale_after_s: float, refresh_s: float) -> snapshot.Snapshot:
        """The healthy nodes as an immutable snapshot, rebuilt when the view changed (at most every
        `refresh_s`) and every FULL_REBUILD_S regardless, so a silent node drops out."""
        current = self._snapshot
        if current is not None:
            age = now - current.built_at
            if age < FULL_REBUILD_S and not (self._changed and age >= refresh_s):
                return current
        healthy = (
            n for n in self.nodes.values() if n.node_id not in self.cordoned and n.healthy(now, stale_after_s)
        )
        fresh = self._snapshot = snapshot.build(
            (snapshot.node_info(n.record, n.heartbeat, n.recent) for n in healthy), now
        )
        self._changed = False
        return fresh

    def set_cordoned(self, cordoned: frozenset[str]) -> None:
        self.cordoned = cordoned
        self._changed = True

    def reserve(self, node_id: str, key: str) -> None:
        """An invocation of `key` is sent to `node_id` (the Kubernetes framework's Reserve):
        placement counts it against the node's capacity and the function's instances there
        until `unreserve`, fresher than any heartbeat."""
        increment(self.held, node_id)
        increment(self.held_instances, (node_id, key))

    def unreserve(self, node_id: str, key: str) -> None:
        """The invocation's attempt on `node_id` ended, however it went."""
        decrement(self.held, node_id)
        decrement(self.held_instances, (node_id, key))

    def ran(self, node_id: str, key: str) -> None:
        """`node_id` just ran `key`: it probably holds it warm until its next heartbeat says so."""
        node = self.nodes.get(node_id)
        if node is not None and key not in node.recent:
            node.recent.add(key)
            self._changed = True

    def unreachable(self, node_id: str) -> None:
        node = self.nodes.get(node_id)
        if node is not None:
            node.unreachable = True
            self._changed = True

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
        self._changed = True

    def remove_node(self, node_id: str) -> None:
        """Out of placement. Its last heartbeat is kept (with those of nodes not registered
        yet): a node whose lease lapsed while it lives still beats, and registers again."""
        node = self.nodes.pop(node_id, None)
        self._early_heartbeats.pop(node_id, None)
        if node is not None and node.heartbeat is not None and node.heartbeat_at is not None:
            self._keep_early(node.heartbeat, node.heartbeat_at)
        self._changed = True

    def last_heard(self, node_id: str) -> float | None:
        """When `node_id`'s last heartbeat came, registered or not (None: never, or forgotten)."""
        node = self.nodes.get(node_id)
        if node is not None:
            return node.heartbeat_at
        early = self._early_heartbeats.get(node_id)
        return None if early is None else early[1]

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
            self._keep_early(hb, now)
            return
        node.heartbeat, node.heartbeat_at = hb, now
        node.unreachable = False
        node.recent.clear()
        self._changed = True

    def _keep_early(self, hb: Heartbeat, at: float) -> None:
        early = self._early_heartbeats
        early.pop(hb.node_id, None)  # re-inserted last: the oldest is first
        early[hb.node_id] = (hb, at)
        if len(early) > MAX_EARLY_HEARTBEATS:
            del early[next(iter(early))]

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
        record = self.functions.pop((tenant, name), None)
        if record is not None:
            self.removed_deployments[(tenant, name, record.deployed_at)] = None
            if len(self.removed_deployments) > MAX_REMOVED_REMEMBERED:
                self.removed_deployments.popitem(last=False)

    def reset_functions(self, records: list[FunctionRecord]) -> None:
        fresh = {(r.spec.tenant, r.spec.name): r for r in records}
        for gone in self.functions.keys() - fresh.keys():
            self.remove_function(*gone)
        self.functions = fresh

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
    """What a warm instance is an instance of: the function's code, or for an eBPF function its
    approved program (nodes that run eBPF report loaded programs under this key)."""
    code = record.program_digest or record.bundle_digest
    return instance_key(record.spec.tenant, record.spec.name, code)
