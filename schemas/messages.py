"""Every NATS message and etcd record. Frozen, keyword-only Structs; new fields get defaults.

Families are tagged unions so one decoder can tell a reply from an error without guessing.
"""

from typing import Annotated, Literal

import msgspec

from schemas.ebpf import MapSpec, ProgType, Signed
from schemas.errors import Error, ErrorCode

Runtime = Literal["python", "exec", "ebpf"]
Placement = Literal["host", "dpu", "any"]
NodeKind = Literal["host", "dpu"]
# How a host node starts functions (host_node.sandbox.settings); a shard of its pool runs one of
# the three sandboxed modes.
PoolMode = Literal["naive", "pool", "prewarm"]
SandboxMode = Literal["plain", "naive", "pool", "prewarm"]


class EbpfSpec(msgspec.Struct, frozen=True, kw_only=True):
    """The `[ebpf]` table of an ebpf function's `function.toml`. It travels inside NodeInvoke and
    etcd records, so unknown fields are not forbidden here (a field added later must not break
    an older reader); `schemas.manifest` refuses unknown keys in the table instead."""

    object: str  # the ELF object, relative to the function's directory
    program: str | None = None  # the program's function name, if the object holds several
    prog_type: ProgType = "xdp"
    # how the verifier checks it (docs/architecture.md §5): auto takes strict when it passes
    verify_mode: Literal["auto", "strict", "proven"] = "auto"


class PythonSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A python function's `[python]` table."""

    # PEP 508 requirements (wheels only): built once per distinct set into the function's
    # dependency layer on the deploying side; from `requirements.txt` when the table has none
    requirements: list[str] = []


class FunctionSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a tenant declares in `function.toml` (see `schemas.manifest` for the rules)."""

    name: str
    runtime: Runtime
    tenant: str = "default"
    handler: str | None = None  # python: "module:function"
    command: list[str] | None = None  # exec: argv, run in the bundle directory
    memory_mb: int = 128
    timeout_ms: int = 3000
    concurrency: int = 8  # most instances of this function one node runs at once
    # Most invocations of this function running at once in the whole cluster (0: only the
    # tenant's limit applies). Beyond it invocations wait in the scheduler's queue, then throttle.
    max_concurrency: int = 0
    placement: Placement = "host"
    ebpf: EbpfSpec | None = None
    # python: what a handle(event, context) handler's event is: the payload's bytes, or the
    # payload decoded as JSON
    payload: Literal["bytes", "json"] = "bytes"
    python: PythonSpec | None = None


class FunctionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """etcd value at `keys.function(tenant, name)`: a deployed function and its code bundle."""

    spec: FunctionSpec
    bundle_digest: str  # "sha256-<hex>" of the bundle bytes
    bundle_size: int
    deployed_at: float  # unix seconds
    program_digest: str = ""  # ebpf: the approved program, at keys.program(digest, tenant, name)
    map_memory_bytes: int = 0  # ebpf: what its maps take in a DPU tenant's partition
    program_key: str = ""  # ebpf: the id of the verifier key that signed the program
    layer_digest: str = ""  # python: its dependency layer in the bundle store ("": none)


class Partition(msgspec.Struct, frozen=True, kw_only=True):
    """How a DPU node splits itself per tenant (each tenant gets this much)."""

    concurrency: int  # programs of one tenant running at once
    programs: int  # programs of one tenant loaded at once
    map_memory_bytes: int


class NodeRecord(msgspec.Struct, frozen=True, kw_only=True):
    """etcd value at `keys.node(id)`, written under a lease the node keeps alive."""

    node_id: str
    kind: NodeKind
    hostname: str
    pid: int
    capacity: int  # invocations the node runs at once
    started_at: float
    memory_mb: int = 0  # memory for function instances (0: not accounted)
    runs_ebpf: bool = False  # can load signed eBPF programs (DPU nodes; hosts with trusted keys)
    partition: Partition | None = None  # per-tenant shares of an eBPF-running node
    # The verifier keys (ids) whose signatures it believes: deploy refuses a program none of the
    # nodes that could run it would load. Stated by the node itself (only it writes its key).
    trusted_keys: list[str] = []
    version: str = ""  # the hetfaas release it runs ("": from before versions were stated)
    wire: int = 1  # the wire contract it speaks (schemas/version.py)


class SchedulerRecord(msgspec.Struct, frozen=True, kw_only=True):
    """etcd value at `keys.scheduler(id)`, leased like a node's."""

    scheduler_id: str
    hostname: str
    pid: int
    started_at: float
    version: str = ""
    wire: int = 1


class PoolShard(msgspec.Struct, frozen=True, kw_only=True, tag="pool_shard"):
    """One shard of a host node's sandbox pool, as its spawner last reported it."""

    shard: int
    mode: PoolMode
    free: int  # cgroup slots ready
    prewarmed: int  # sandboxes waiting to exec (prewarm mode)
    busy: int
    recycling: int
    created: int
    recycled: int
    vanished: int  # slots that disappeared under us (another cgroup manager) and were replaced
    inline: int  # slots created on the start path because the pool was empty
    refilling: bool
    ended: int = 0  # launches whose sandbox has ended (its slot is being recycled or removed)
    building: int = 0  # sandboxes being prewarmed now


class TenantUsage(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """One tenant's use of an eBPF-running node's partition."""

    running: int
    programs: int
    map_memory_bytes: int


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True, tag="heartbeat"):
    """Published by every node on `subjects.heartbeat(id)`: its load and its idle warm instances
    (on an eBPF-running node: its loaded programs, each counted as one warm instance)."""

    node_id: str
    seq: int
    inflight: int
    capacity: int
    instances: int
    warm_idle: dict[str, int] = {}  # instance_key(...) -> idle instances ready for reuse
    sandbox_mode: SandboxMode | Literal[""] = ""  # "": not a host node
    pool: list[PoolShard] = []
    tenant_runs: dict[str, int] = {}  # DPU nodes: program runs per tenant since the node started
    memory_used_mb: int = 0  # memory limits of the instances alive now
    tenants: dict[str, TenantUsage] = {}  # eBPF-running nodes: each tenant's partition in use
    stem_cells: int = 0  # python interpreters waiting in their sandboxes for a cold start
    templates: int = 0  # python functions whose cold starts here fork from a template


# --- invoke -----------------------------------------------------------------------------------


class InvokeRequest(msgspec.Struct, frozen=True, kw_only=True, tag="invoke"):
    """Client -> scheduler on `subjects.invoke(tenant, function)`."""

    invocation_id: str
    tenant: str
    function: str
    payload: bytes = b""
    timeout_ms: int = 30_000  # the caller's whole deadline, measured from when the scheduler receives it
    # what invoked it, as OpenTelemetry's faas.trigger names it (datasource, http, pubsub,
    # timer, other); anything else is traced as "other"
    trigger: str = "other"
    # > 1: the caller sent this invocation before and heard nothing (its scheduler may have died);
    # the scheduler first asks the nodes whether one of them has it already.
    attempt: int = 1


class NodeInvoke(msgspec.Struct, frozen=True, kw_only=True, tag="node_invoke"):
    """Scheduler -> node on `subjects.node_invoke(id)`. Carries the spec so nodes need no lookups."""

    invocation_id: str
    spec: FunctionSpec
    bundle_digest: str
    payload: bytes
    timeout_ms: int  # what is left of the caller's deadline when the scheduler sends it
    program_digest: str = ""  # ebpf: the approved program to run, at keys.program(digest, tenant, name)
    layer_digest: str = ""  # python: the function's dependency layer in the bundle store
    attempt: int = 1
    # When set, the node sends its answer straight to the caller here and acknowledges the
    # scheduler with an empty message; refusals the scheduler retries (throttled, unavailable)
    # still go to the scheduler. Saves the caller a hop through the scheduler.
    reply_to: str = ""
    # With reply_to: the scheduler takes its acknowledgements batched with others to the same
    # inbox (`Acks`). The caller's answer always goes alone: batched answers move a caller's
    # whole window of invocations as one wave, and measured 10-20% slower (bench/RESULTS.md).
    batch_acks: bool = False
    # How long the instance stays warm after this invocation, and, when prewarm_after_ms is set,
    # when to start a fresh one instead (the scheduler's per-function keep-alive policy; 0: the
    # node's own default).
    keep_alive_ms: int = 0
    prewarm_after_ms: int = 0
    trigger: str = ""  # what invoked it (the caller's InvokeRequest.trigger), for traces
    # the function's record's deployed_at: an invocation of a deployment removed since does not
    # bring the function back on the node (host_node/removals.py)
    deployed_at: float = 0.0


class Acks(msgspec.Struct, frozen=True, kw_only=True, tag="acks"):
    """Several empty acknowledgements to one requester's inbox, on `subjects.batched(reply
    subject)`: the reply tokens acknowledged. A node sends what it finished in one loop
    iteration this way, one message instead of one per invocation, to requesters that said
    they read them (`NodeInvoke.batch_acks`)."""

    tokens: list[str]


class ApprovedProgram(msgspec.Struct, frozen=True, kw_only=True):
    """etcd value at `keys.program(digest, tenant, name)`: an ebpf function's bytecode with its
    signed approval.
    Nodes trust it only through the signature, checked against keys pinned in their own settings."""

    instructions: bytes
    prog_type: ProgType
    maps: list[MapSpec]
    map_refs: dict[int, str]
    signed: Signed


class InvokeReply(msgspec.Struct, frozen=True, kw_only=True, tag="invoke_reply"):
    invocation_id: str
    node: str
    cold_start: bool
    duration_ms: float  # node-side, from receipt to reply
    output: bytes
    phases_ms: dict[str, float] = {}
    # how a cold start got its instance: "fresh" (a sandbox and runtime started for it),
    # "stem_cell" (a python runtime already waiting in its sandbox), "template_fork" (forked
    # from the function's template on the node); "" when warm
    start_path: str = ""
    attempts: int = 1
    retval: int | None = None  # ebpf: the program's return code ...
    action: str = ""  # ... and its name for the program type (XDP_DROP)
    run_ns: int | None = None  # ebpf: kernel-measured run time


class ErrorReply(msgspec.Struct, frozen=True, kw_only=True, tag="error"):
    error: Error
    invocation_id: str = ""
    node: str = ""


def error_reply(
    code: ErrorCode, message: str, invocation_id: str = "", node: str = "", detail: str | None = None
) -> ErrorReply:
    """The one way every service builds an error reply."""
    return ErrorReply(
        error=Error(code=code, message=message, detail=detail), invocation_id=invocation_id, node=node
    )


# --- control: deploy, list, status -----------------------------------------------------------


class DeployRequest(msgspec.Struct, frozen=True, kw_only=True, tag="deploy"):
    spec: FunctionSpec
    bundle_digest: str
    bundle_size: int
    program: "ApprovedProgram | None" = None  # ebpf: what the verifier approved and signed
    layer_digest: str = ""  # python: the dependency layer, uploaded to the bundle store before


class UploadBundle(msgspec.Struct, frozen=True, kw_only=True, tag="upload_bundle"):
    """Tenant -> scheduler on `subjects.control(tenant, UPLOAD)`: store a bundle. Only schedulers
    write the bundle store (nodes only read it), so a tenant can neither read another's code nor
    replace it. With `data` empty it only asks whether the store has `digest` already."""

    digest: str
    data: bytes = b""
    # A part of something larger than one message (a dependency layer): stored as it is, not
    # checked as a bundle; the whole is assembled by a later UploadBundle naming its `parts`.
    part: bool = False
    # The digests of parts uploaded before, in order: the scheduler joins them into `digest`
    # (checked as a bundle, within its layer size limit) and stores that.
    parts: list[str] = []


class UploadReply(msgspec.Struct, frozen=True, kw_only=True, tag="upload_reply"):
    digest: str
    stored: bool  # the store has it (now, or already)


class DeployReply(msgspec.Struct, frozen=True, kw_only=True, tag="deploy_reply"):
    function: FunctionRecord
    revision: int
    updated: bool  # false when the same code and spec were already deployed


class RemoveFunction(msgspec.Struct, frozen=True, kw_only=True, tag="remove_function"):
    """Client -> scheduler: take a function out of service. Invocations already running finish;
    its bundle stays in the store (content-addressed: other functions may share it)."""

    tenant: str
    name: str


class RemoveReply(msgspec.Struct, frozen=True, kw_only=True, tag="remove_reply"):
    function: FunctionRecord  # as it was deployed


class FunctionRemoved(msgspec.Struct, frozen=True, kw_only=True, tag="function_removed"):
    """Scheduler -> every node on `subjects.FUNCTION_REMOVED`, once a function is removed: its
    idle instances stop now rather than at their keep-alive. (DPU nodes learn it from etcd, where
    the function's program approvals are deleted with it.)"""

    tenant: str
    name: str
    deployed_at: float = 0.0  # the removed deployment's (FunctionRecord.deployed_at)


class LogPosition(msgspec.Struct, frozen=True, array_like=True):
    """Where a read of a node's log of a function ended: `hetfaas logs -f` reads on from there."""

    generation: int  # the log's rotations: an offset of another generation means nothing
    offset: int


class LogsRequest(msgspec.Struct, frozen=True, kw_only=True, tag="logs"):
    """Client -> scheduler -> every host node: the last `lines` lines of a function's output;
    only those written since `since` (unix seconds, to the node's 2 s resolution), or after each
    node's position in `after` (a node not named there: its last lines)."""

    tenant: str
    function: str
    lines: int = 100
    since: float = 0.0
    after: dict[str, LogPosition] = {}


class NodeLogs(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    lines: list[str]  # oldest first, without their newlines
    truncated: bool = False  # the node holds earlier lines too
    position: LogPosition | None = None  # where this read ended


class LogsReply(msgspec.Struct, frozen=True, kw_only=True, tag="logs_reply"):
    logs: list[NodeLogs]  # the nodes holding any, by node id


class RecentInvocation(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One invocation as the node that answered it remembers it (fabric/recent.py)."""

    invocation_id: str
    node: str
    at: float  # unix seconds, when it was answered
    cold_start: bool = False
    duration_ms: float | None = None  # None: it failed
    error: str = ""  # the error's code
    message: str = ""  # its message, cut to 200 characters


class RecentRequest(msgspec.Struct, frozen=True, kw_only=True, tag="recent"):
    """Scheduler -> node: a function's last invocations there (`node_recent`)."""

    tenant: str
    function: str


class RecentReply(msgspec.Struct, frozen=True, kw_only=True, tag="recent_reply"):
    invocations: list[RecentInvocation]  # oldest first


class DescribeRequest(msgspec.Struct, frozen=True, kw_only=True, tag="describe"):
    """Client -> scheduler: one function in full (`hetfaas describe`)."""

    tenant: str
    function: str


class DescribeReply(msgspec.Struct, frozen=True, kw_only=True, tag="describe_reply"):
    function: FunctionRecord
    revision: int  # etcd's revision of its record (0: not known, etcd unreachable)
    warm: dict[str, int]  # node id -> its idle warm instances (a DPU: the program, loaded)
    recent: list[RecentInvocation]  # every node's, newest first
    unanswered: list[str] = []  # nodes that did not say what they ran


class ListFunctions(msgspec.Struct, frozen=True, kw_only=True, tag="list_functions"):
    tenant: str | None = None


class FunctionList(msgspec.Struct, frozen=True, kw_only=True, tag="function_list"):
    functions: list[FunctionRecord]


class StatusRequest(msgspec.Struct, frozen=True, kw_only=True, tag="status"):
    pass


class NodeStatus(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    kind: NodeKind
    hostname: str
    healthy: bool
    inflight: int
    capacity: int
    instances: int
    warm_idle: int
    heartbeat_age_ms: float | None  # None: registered but no heartbeat seen yet
    version: str = ""  # the hetfaas release it runs
    cordoned: bool = False  # drained by an operator: nothing is placed on it
    sandbox_mode: SandboxMode | Literal[""] = ""  # "": not a host node
    pool: list[PoolShard] = []
    tenant_runs: dict[str, int] = {}
    stem_cells: int = 0
    templates: int = 0


class ReplicaBeat(msgspec.Struct, frozen=True, kw_only=True, tag="replica_beat"):
    """Published by every scheduler replica on `subjects.replica_beat(id)`. Replicas count each
    other from these to split limits and node capacity into shares; `status` shows them."""

    scheduler_id: str
    seq: int
    running: int  # invocations this replica has placed and not yet seen answered
    queued: int  # invocations waiting in its admission queue
    throttled: int  # invocations it turned away since it started (queue full or waited too long)
    etcd_ok: bool  # its etcd watches are live
    view_age_ms: float  # how old the freshest part of its view might be (oldest heartbeat, or etcd outage)
    nodes_healthy: int
    fenced: bool = False  # cut off from etcd, it takes no work from the queue group (scheduler/fence.py)
    functions: int = 0  # deployed functions its view holds (a deploy reaches other replicas by etcd's watch)
    # "tenant/function" -> the last time (unix seconds) it arrived here since the previous beat:
    # each replica measures the gaps of the arrivals it sees from the last arrival anywhere.
    arrivals: dict[str, float] = {}


class ClusterStatus(msgspec.Struct, frozen=True, kw_only=True, tag="cluster_status"):
    answered_by: str  # the scheduler replica whose view this is
    schedulers: list[SchedulerRecord]
    nodes: list[NodeStatus]
    functions: int
    replicas: list[ReplicaBeat] = []  # every replica's last beat, as the answering replica heard it


# A tenant's limit, checked wherever one is decoded (a request to set it, its record in etcd):
# at least 1 (0 or less would throttle the tenant for good), at most what `hetfaas tenant set`
# takes.
TenantLimit = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
TenantWeight = Annotated[int, msgspec.Meta(ge=1, le=1000)]


class TenantRecord(msgspec.Struct, frozen=True, kw_only=True):
    """etcd value at `keys.tenant(name)`: a tenant's limits (absent: the scheduler's defaults)."""

    tenant: str
    max_concurrency: TenantLimit  # its invocations running at once in the whole cluster
    # Its share of the nodes' room while tenants wait for it, against the others' weights.
    weight: TenantWeight = 1


class SetTenant(msgspec.Struct, frozen=True, kw_only=True, tag="set_tenant"):
    tenant: str
    max_concurrency: TenantLimit
    weight: TenantWeight = 1


class DrainNode(msgspec.Struct, frozen=True, kw_only=True, tag="drain_node"):
    """Operator -> scheduler (`subjects.DRAIN`), then scheduler -> the node (`node_drain`): no new
    placements on it (`drain`), its running invocations finish, its warm instances are released;
    or, with `drain` false, placements again (uncordon)."""

    node_id: str
    drain: bool = True


class DrainReply(msgspec.Struct, frozen=True, kw_only=True, tag="drain_reply"):
    node_id: str
    cordoned: bool  # nothing is placed on it
    released: int = 0  # warm instances it stopped at once (those running stop when their call ends)
    running: int = 0  # invocations it still runs
    note: str = ""  # e.g. the node could not be told (it is down): it is cordoned all the same


class TenantReply(msgspec.Struct, frozen=True, kw_only=True, tag="tenant_reply"):
    record: TenantRecord


class WhereIs(msgspec.Struct, frozen=True, kw_only=True, tag="where_is"):
    """Scheduler -> every node on `subjects.WHERE_IS`: who has this invocation (a caller's retry)?
    Every node answers (`HaveIt`), so the scheduler stops waiting once all have said no."""

    invocation_id: str
    tenant: str = ""  # whose function: nodes hold each invocation under tenant, function and id
    function: str = ""


class HaveIt(msgspec.Struct, frozen=True, kw_only=True, tag="have_it"):
    node_id: str
    done: bool  # answered already (it will answer again from its cache), or still running
    has: bool = True  # False: this node has not got it (nodes before this field answered only yes)


InvokeResult = InvokeReply | ErrorReply
DeployResult = DeployReply | ErrorReply
UploadResult = UploadReply | ErrorReply
RemoveResult = RemoveReply | ErrorReply
LogsResult = LogsReply | ErrorReply
ListResult = FunctionList | ErrorReply
StatusResult = ClusterStatus | ErrorReply
TenantResult = TenantReply | ErrorReply


def instance_key(tenant: str, name: str, bundle_digest: str) -> str:
    """Identity of a warm instance: same function *and* same code (a redeploy makes new ones)."""
    return f"{tenant}/{name}@{bundle_digest}"


def function_of(key: str) -> str:
    """The "tenant/name" an instance key belongs to, whatever its code."""
    return key.partition("@")[0]
