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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache

import msgspec

from scheduler.snapshot import NodeInfo, Snapshot


class Fit(Enum):
    YES = "fit"
    NOT_NOW = "wait"  # full now; may fit once something finishes: queue the request
    NEVER = "never"  # cannot fit on this node whatever happens: do not wait for it


# The values made per decision are msgspec Structs: a frozen dataclass's __init__ cost ~2 µs
# here (it sets every field through object.__setattr__), a Struct's ~0.2 µs.


class Status(msgspec.Struct, frozen=True):
    fit: Fit
    reason: str = ""


FITS = Status(Fit.YES)


class Request(msgspec.Struct, frozen=True, kw_only=True):
    """What placement needs to know about one invocation."""

    key: str  # the warm identity: tenant/function@code digest
    tenant: str
    runtime: str
    placement: str  # host | dpu | any
    memory_mb: int = 128
    map_memory_bytes: int = 0
    program_key: str = ""  # ebpf: the key that signed its program (nodes trusting it only)
    instances: int = 0  # most of it one node runs at once (python: its `concurrency`); 0: no cap
    salt: int = 0  # picks the random candidate (a hash of the invocation id)
    exclude: frozenset[str] = frozenset()  # nodes already tried for this invocation


@dataclass
class Cycle:
    """Per-decision context: the snapshot plus what this replica knows that is fresher."""

    snapshot: Snapshot
    held: Mapping[str, int]  # this replica's invocations on each node right now
    held_instances: Mapping[tuple[str, str], int]  # ... per (node id, function key)
    capacity_share: Callable[[int, str], int]  # this replica's share of (capacity, node id)
    home: str = ""  # the request's home node in the ring being considered (set by `place`)
    pack_below: float = 0.5  # the load plugin packs below this utilisation (settings)


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
    _checks: tuple[Filter, ...] = field(init=False, repr=False, compare=False)
    _weighted: tuple[tuple[Score, int], ...] = field(init=False, repr=False, compare=False)

    @property
    def checks(self) -> tuple[Filter, ...]:
        return self._checks

    @property
    def weighted(self) -> tuple[tuple[Score, int], ...]:
        return self._weighted

    def __post_init__(self) -> None:
        object.__setattr__(self, "_checks", tuple(check for _, check in self.filters))
        object.__setattr__(self, "_weighted", tuple((score, weight) for _, score, weight in self.scores))


class Placed(msgspec.Struct, frozen=True):
    node_id: str
    kind: str
    score: float
    scores: dict[str, float]  # per plugin, before weighting: why this node
    considered: int  # nodes the filters looked at


class Unplaced(msgspec.Struct, frozen=True):
    wait: bool  # some node may fit later: queue; False: fail the request now
    reasons: dict[str, int] = {}  # reason -> number of nodes
    kinds: tuple[str, ...] = ("host",)  # the node kinds looked for
    busy: frozenset[str] = frozenset()  # the reasons that may pass (NOT_NOW ones)

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


def place(
    req: Request, snapshot: Snapshot, profile: Profile, cycle: Cycle, explain: bool = True
) -> Placed | Unplaced:
    """The node for `req`, or why there is none. On the invoke path: kept to plain loops.
    `explain`: give the winner's score per plugin (for traces; it costs a little)."""
    search = _Search(req, profile, cycle)
    key_hash = _hash(req.key)
    for kind in stages(req):
        ring = snapshot.rings.get(kind, ())
        size = len(ring)
        if not size:
            continue
        home = key_hash % size
        cycle.home = ring[home].node_id
        search.begin()
        nodes = snapshot.nodes
        warm = [nodes[i] for i in snapshot.warm_index.get(req.key, ()) if nodes[i].kind == kind]
        search.take(warm, 0, 1, profile.warm_candidates)
        search.take(ring, home, _step(size, key_hash), profile.home_candidates)
        search.take(ring, req.salt % size, _step(size, req.salt // size), profile.random_candidates)
        if search.found:
            return _best(req, search.found, profile, cycle, len(search.seen), explain)
    busy = frozenset(search.busy_reasons)
    return Unplaced(wait=bool(busy), reasons=search.why, kinds=stages(req), busy=busy)


class _Search:
    """Candidates of one decision: walks that stop at their first nodes passing every filter."""

    def __init__(self, req: Request, profile: Profile, cycle: Cycle):
        self.req = req
        self.checks = profile.checks
        self.cycle = cycle
        self.why: dict[str, int] = {}  # reason -> nodes that failed for it
        self.busy_reasons: set[str] = set()  # reasons of nodes that may fit later
        self.found: list[NodeInfo] = []
        self.seen: set[str] = set()

    def begin(self) -> None:
        self.found, self.seen = [], set()

    def take(self, nodes: Sequence[NodeInfo], start: int, step: int, wanted: int) -> None:
        """Walk `nodes` from `start` by `step` (co-prime to their number: each once) until
        `wanted` of them pass."""
        size, taken, index = len(nodes), 0, start
        req, cycle, seen = self.req, self.cycle, self.seen
        for _ in range(size):
            if taken >= wanted:
                return
            node = nodes[index]
            index = (index + step) % size
            if node.node_id in seen:
                continue
            seen.add(node.node_id)
            for check in self.checks:
                status = check(req, node, cycle)
                if status is not FITS and status.fit is not Fit.YES:
                    self.why[status.reason] = self.why.get(status.reason, 0) + 1
                    if status.fit is Fit.NOT_NOW:
                        self.busy_reasons.add(status.reason)
                    break
            else:
                self.found.append(node)
                taken += 1


def _best(
    req: Request, found: list[NodeInfo], profile: Profile, cycle: Cycle, considered: int, explain: bool
) -> Placed:
    best, best_total = found[0], -1.0
    if len(found) == 1 and not explain:
        return Placed(best.node_id, best.kind, 0.0, {}, considered)  # nothing to compare
    if len(found) > 1:
        weighted = profile.weighted
        for node in found:  # in candidate order: on equal totals the earlier one stays
            total = 0.0
            for score, weight in weighted:
                total += score(req, node, cycle) * weight
            if total > best_total:
                best, best_total = node, total
    if explain or best_total < 0:
        scores = {name: score(req, best, cycle) for name, score, _ in profile.scores}
        best_total = sum([scores[name] * weight for name, _, weight in profile.scores])
        return Placed(best.node_id, best.kind, best_total, scores if explain else {}, considered)
    return Placed(best.node_id, best.kind, best_total, {}, considered)


def _step(size: int, seed: int) -> int:
    steps = coprime_steps(size)
    return steps[seed % len(steps)]


@lru_cache(maxsize=4096)  # a function's key, hashed on every decision
def _hash(text: str) -> int:
    return zlib.crc32(text.encode())


def home_index(key: str, size: int) -> int:
    return _hash(key) % size


@lru_cache(maxsize=64)
def coprime_steps(size: int) -> tuple[int, ...]:
    """Step sizes that visit every slot of a ring of `size` (OpenWhisk's co-prime steps)."""
    if size <= 2:
        return (1,)
    return tuple(s for s in range(1, size) if math.gcd(s, size) == 1)
