"""The filter and score plugins, and the one table that registers them. Pure.

A filter answers FITS, NOT_NOW (full now: the request may wait for it) or NEVER (this node can
never run it). A score rates a node that passed every filter from 0 to 100; settings weight it.
"""

from scheduler.framework import FITS, Cycle, Filter, Fit, Profile, Request, Score, Status
from scheduler.settings import PlacementSettings
from scheduler.snapshot import NO_POOL, NodeInfo

# --- filters -----------------------------------------------------------------------------------


def runtime(req: Request, node: NodeInfo, cycle: Cycle) -> Status:
    """eBPF functions need a node that loads signed programs; python and exec need a host."""
    if req.runtime == "ebpf":
        if not node.runs_ebpf:
            return Status(Fit.NEVER, "cannot load eBPF")
        if req.program_key and node.trusted_keys and req.program_key not in node.trusted_keys:
            return Status(Fit.NEVER, f"does not trust key {req.program_key}")
        return FITS
    return FITS if node.kind == "host" else Status(Fit.NEVER, f"a {node.kind} runs eBPF only")


def not_tried(req: Request, node: NodeInfo, cycle: Cycle) -> Status:
    if node.node_id in req.exclude:
        return Status(Fit.NEVER, "already tried for this invocation")
    return FITS


def capacity(req: Request, node: NodeInfo, cycle: Cycle) -> Status:
    """Room in this replica's share of the node's capacity (see shares.py for why shares). The
    node's own reports are not consulted: they are up to a heartbeat old, and the other
    replicas cannot exceed their shares; the node still refuses work beyond its capacity."""
    if node.capacity <= 0:
        return Status(Fit.NEVER, "have no capacity")
    if cycle.held.get(node.node_id, 0) >= cycle.capacity_share(node.capacity, node.node_id):
        return Status(Fit.NOT_NOW, "are full")
    return FITS


def memory(req: Request, node: NodeInfo, cycle: Cycle) -> Status:
    if not node.memory_mb:
        return FITS
    if req.memory_mb > node.memory_mb:
        return Status(Fit.NEVER, f"have less than {req.memory_mb} MB for functions")
    if node.memory_used_mb + req.memory_mb > node.memory_mb and req.key not in node.warm:
        return Status(Fit.NOT_NOW, f"have no {req.memory_mb} MB free")
    return FITS


def tenant_partition(req: Request, node: NodeInfo, cycle: Cycle) -> Status:
    """An eBPF-running node gives each tenant a partition: running programs, loaded programs, map
    memory. A program already loaded needs only a running slot."""
    part = node.partition
    if req.runtime != "ebpf" or part is None:
        return FITS
    usage = node.tenants.get(req.tenant)
    if usage is None:
        return FITS if req.map_memory_bytes <= part.map_memory_bytes else _too_big_maps(req)
    if usage.running >= part.concurrency:
        return Status(Fit.NOT_NOW, "have the tenant's partition busy")
    if req.key in node.warm:
        return FITS
    if usage.programs >= part.programs:
        return Status(Fit.NEVER, "have the tenant's program slots used up")
    if usage.map_memory_bytes + req.map_memory_bytes > part.map_memory_bytes:
        return Status(Fit.NEVER, "have the tenant's map memory used up")
    return FITS


def _too_big_maps(req: Request) -> Status:
    return Status(Fit.NEVER, f"give a tenant less map memory than its {req.map_memory_bytes} bytes")


# --- scores ------------------------------------------------------------------------------------


def warm(req: Request, node: NodeInfo, cycle: Cycle) -> float:
    """A warm instance (host) or a loaded program (DPU): no cold start at all."""
    return 100.0 if req.key in node.warm else 0.0


FREE_SLOTS_FULL_MARKS = 4


def free_slots(req: Request, node: NodeInfo, cycle: Cycle) -> float:
    """Sandboxes ready in the node's pool: a cold start that waits on no cgroup work. Every slot
    fits every size class (its limits are set as it is taken), so the count is what matters."""
    if node.free_slots == NO_POOL:
        return 50.0
    return 100.0 * min(node.free_slots, FREE_SLOTS_FULL_MARKS) / FREE_SLOTS_FULL_MARKS


def instances(req: Request, node: NodeInfo, cycle: Cycle) -> float:
    """Room for this function's instances on the node. A python function runs at most
    `concurrency` instances per node, one invocation each: a call beyond that queues inside the
    node. 100 while there is room, then at most 50, falling as the queue grows, so an idle slot
    elsewhere (even a cold one) beats queueing, and queues even out when every node is full.
    A score rather than a filter: when every node is full a node queues the call, cheaply,
    instead of the scheduler."""
    if not req.instances:
        return 100.0
    running = cycle.held_instances.get((node.node_id, req.key), 0)
    return 100.0 if running < req.instances else 50.0 * req.instances / running


def home(req: Request, node: NodeInfo, cycle: Cycle) -> float:
    """The function's home node: where its earlier calls went, so where warm instances collect."""
    return 100.0 if node.node_id == cycle.home else 0.0


def load(req: Request, node: NodeInfo, cycle: Cycle) -> float:
    """Hermod (SoCC'22): pack at low load (fewer nodes warm, fewer cold starts), spread at high
    load (less queueing). Packing fills a node up to `pack_below` of its capacity and no
    further (the score peaks there), so a hot node is not packed into overload. Load counts
    this replica's fresher in-flight count where higher."""
    running = node.inflight
    held = cycle.held.get(node.node_id, 0)
    if held > running:
        running = held
    busy = min(running / (node.capacity or 1), 1.0)
    pack_below = cycle.pack_below
    if busy < pack_below and cycle.snapshot.utilisation.get(node.kind, 0.0) < pack_below:
        return 100.0 * busy
    return 100.0 * (1.0 - busy)


# --- the table ---------------------------------------------------------------------------------

FILTERS: dict[str, Filter] = {
    "runtime": runtime,
    "not_tried": not_tried,
    "capacity": capacity,
    "memory": memory,
    "tenant_partition": tenant_partition,
}
REQUIRED_FILTERS = ("runtime", "not_tried")  # correctness, not policy: always on
SCORES: dict[str, Score] = {
    "warm": warm,
    "free_slots": free_slots,
    "home": home,
    "load": load,
    "instances": instances,
}


def unknown_plugins(settings: PlacementSettings) -> list[str]:
    """Names in the settings that no plugin answers to."""
    return sorted(
        [f"filter {n!r}" for n in settings.filters if n not in FILTERS]
        + [f"score {n!r}" for n in settings.weights if n not in SCORES]
    )


def profile(settings: PlacementSettings) -> Profile:
    if problems := unknown_plugins(settings):
        raise ValueError(
            f"unknown placement plugins: {', '.join(problems)} (filters: "
            f"{', '.join(FILTERS)}; scores: {', '.join(SCORES)})"
        )
    names = [*REQUIRED_FILTERS, *(n for n in settings.filters if n not in REQUIRED_FILTERS)]
    return Profile(
        filters=tuple((n, FILTERS[n]) for n in names),
        scores=tuple((n, SCORES[n], w) for n, w in sorted(settings.weights.items()) if w > 0),
        warm_candidates=settings.warm_candidates,
        home_candidates=settings.home_candidates,
        random_candidates=settings.random_candidates,
    )
