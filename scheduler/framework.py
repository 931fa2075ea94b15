"""Placement: filter -> score over a snapshot, in the style of the Kubernetes scheduler framework.
Pure: a snapshot, a request and this replica's own counts in; a decision out.

Which nodes are looked at keeps a decision's cost independent of the cluster's size:
  1. nodes that hold the function warm (from the snapshot's index, a few at most);
  2. the function's home node and its successors on the ring, stepping by a number co-prime to
     the ring's size (OpenWhisk): repeated calls find the instances earlier calls left warm;
  3. a random node and its successors (power of two choices, as Sparrow): a second opinion that
     spreads load when the home node is busy.
Each walk stops at its first node that passes every filter; a walk visits more nodes only while
nodes fail the filters, so a decision reads O(candidates) nodes unless the cluster is nearly full.
The candidates are scored by the enabled score plugins, weighted; ties go to the earlier candidate
(warm, then home, then random), so equal inputs always give the same node.
"""

import math
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache

from scheduler.snapshot import NodeInfo, Snapshot


class Fit(Enum):
    YES = "fit"
    NOT_NOW = "wait"  # full now; may fit once something finishes: queue the request
    NEVER = "never"  # cannot fit on this node whatever happens: do not wait for it


@dataclass(frozen=True, slots=True)
class Status:
    fit: Fit
    reason: str = ""


FITS = Status(Fit.YES)


@dataclass(frozen=True, slots=True)
class Request:
    """What placement needs to know about one invocation."""

    key: str  # the warm identity: tenant/function@code digest
    tenant: str
    runtime: str
    placement: str  # host | dpu | any
    memory_mb: int = 128
    map_memory_bytes: int = 0
    salt: int = 0  # picks the random candidate (a hash of the invocation id)
    exclude: frozenset[str] = frozenset()  # nodes already tried for this invocation


@dataclass(frozen=True)
class Cycle:
    """Per-decision context: the snapshot plus what this replica knows that is fresher."""

    snapshot: Snapshot
    held: Mapping[str, int]  # this replica's invocations on each node right now
    capacity_share: Callable[[int, str], int]  # this replica's share of (capacity, node id)
    home: str = ""  # the request's home node in the ring being considered


Filter = Callable[[Request, NodeInfo, Cycle], Status]
Score = Callable[[Request, NodeInfo, Cycle], float]  # 0..100


@dataclass(frozen=True)
class Profile:
    """The enabled plugins and their weights (from settings, checked against the registry)."""

    filters: tuple[tuple[str, Filter], ...]
    scores: tuple[tuple[str, Score, int], ...]
    warm_candidates: int = 2
    home_candidates: int = 1
    random_candidates: int = 1


@dataclass(frozen=True)
class Placed:
    node_id: str
    kind: str
    score: float
    scores: dict[str, float]  # per plugin, before weighting: why this node
    considered: int  # nodes the filters looked at


@dataclass(frozen=True)
class Unplaced:
    wait: bool  # some node may fit later: queue; False: fail the request now
    reasons: dict[str, int] = field(default_factory=dict)  # reason -> number of nodes
    kinds: tuple[str, ...] = ("host",)  # the node kinds looked for

    def explain(self, total: int) -> str:
        if not self.reasons:
            return f"no healthy {' or '.join(self.kinds)} node"
        parts = ", ".join(f"{count} {reason}" for reason, count in sorted(self.reasons.items()))
        return f"0/{total} nodes can run it: {parts}"


def stages(req: Request) -> tuple[str, ...]:
    """Node kinds to try, in order. eBPF functions belong on DPUs; with placement "any" they
    fall back to hosts that can load eBPF when no DPU has room. Python and exec run on hosts."""
    if req.runtime != "ebpf":
        return ("host",)
    return ("dpu", "host") if req.placement == "any" else ("dpu",)


def place(req: Request, snapshot: Snapshot, profile: Profile, cycle: Cycle) -> Placed | Unplaced:
    reasons: Counter[str] = Counter()
    wait = False
    for kind in stages(req):
        ring = snapshot.rings.get(kind, ())
        if not ring:
            continue
        home = ring[home_index(req.key, len(ring))]
        stage = Cycle(snapshot, cycle.held, cycle.capacity_share, home.node_id)
        found, seen, why, busy = _candidates(req, ring, profile, stage)
        if found:
            return _best(req, found, profile, stage, len(seen))
        reasons.update(why)
        wait = wait or busy
    return Unplaced(wait=wait, reasons=dict(reasons), kinds=stages(req))


def _candidates(
    req: Request, ring: tuple[NodeInfo, ...], profile: Profile, cycle: Cycle
) -> tuple[list[NodeInfo], set[str], Counter[str], bool]:
    """(nodes that passed every filter, ids looked at, why the others failed, whether one of
    those may fit later)."""
    found: list[NodeInfo] = []
    seen: set[str] = set()
    why: Counter[str] = Counter()
    busy = False

    def take(walk: Iterator[NodeInfo], wanted: int) -> None:
        taken = 0
        for node in walk:
            if taken >= wanted:
                return
            if node.node_id in seen:
                continue
            seen.add(node.node_id)
            status = _filter(req, node, profile, cycle)
            if status.fit is Fit.YES:
                found.append(node)
                taken += 1
            else:
                why[status.reason] += 1
                nonlocal busy
                busy = busy or status.fit is Fit.NOT_NOW

    nodes = cycle.snapshot.nodes
    warm = (nodes[i] for i in cycle.snapshot.warm_index.get(req.key, ()) if nodes[i].kind == ring[0].kind)
    take(warm, profile.warm_candidates)
    take(walk_ring(ring, home_index(req.key, len(ring)), _hash(req.key)), profile.home_candidates)
    take(walk_ring(ring, req.salt % len(ring), req.salt // len(ring)), profile.random_candidates)
    return found, seen, why, busy


def _filter(req: Request, node: NodeInfo, profile: Profile, cycle: Cycle) -> Status:
    for _, check in profile.filters:
        status = check(req, node, cycle)
        if status.fit is not Fit.YES:
            return status
    return FITS


def _best(req: Request, found: list[NodeInfo], profile: Profile, cycle: Cycle, considered: int) -> Placed:
    best: Placed | None = None
    for node in found:  # in candidate order: on equal totals the earlier one stays
        scores = {name: score(req, node, cycle) for name, score, _ in profile.scores}
        total = sum(scores[name] * weight for name, _, weight in profile.scores)
        if best is None or total > best.score:
            best = Placed(node.node_id, node.kind, total, scores, considered)
    assert best is not None
    return best


def _hash(text: str) -> int:
    return zlib.crc32(text.encode())


def home_index(key: str, size: int) -> int:
    return _hash(key) % size


def walk_ring(ring: tuple[NodeInfo, ...], start: int, seed: int) -> Iterator[NodeInfo]:
    """Every node of the ring once, from `start`, stepping by a number co-prime to its size."""
    size = len(ring)
    steps = coprime_steps(size)
    step = steps[seed % len(steps)]
    index = start
    for _ in range(size):
        yield ring[index]
        index = (index + step) % size


@lru_cache(maxsize=64)
def coprime_steps(size: int) -> tuple[int, ...]:
    """Step sizes that visit every slot of a ring of `size` (OpenWhisk's co-prime steps)."""
    if size <= 2:
        return (1,)
    return tuple(s for s in range(1, size) if math.gcd(s, size) == 1)
