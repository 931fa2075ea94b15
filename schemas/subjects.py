"""The subject table. Nobody writes a subject string anywhere else (docs/architecture.md §3)."""

from functools import lru_cache

SCHEDULER_QUEUE = "hetfaas-scheduler"
VERIFIER_QUEUE = "hetfaas-verifier"
BUNDLE_BUCKET = "hetfaas-bundles"
TRACES_STREAM = "HETFAAS_TRACES"  # a planned cluster's spans (fabric.trace_stream)
TRACES_ALL = "hetfaas.traces.>"

INVOKE_ALL = "hetfaas.invoke.*.*"
HEARTBEAT_ALL = "hetfaas.heartbeat.*"
# A tenant's control requests carry the tenant in the subject, where NATS permissions decide who
# may publish: `hetfaas.control.<tenant>.<verb>`. The scheduler takes the tenant from there.
CONTROL_ALL = "hetfaas.control.*.*"
DEPLOY = "deploy"
UPLOAD = "upload"  # a bundle, written to the bundle store by the scheduler (nodes only read it)
REMOVE = "remove"
LOGS = "logs"
LIST_FUNCTIONS = "functions"
MAPS = "maps"
DESCRIBE = "describe"
CONTROL_VERBS = (DEPLOY, UPLOAD, REMOVE, LOGS, LIST_FUNCTIONS, MAPS, DESCRIBE)
# The operator's requests: cluster-wide, published only with operator credentials.
STATUS = "hetfaas.admin.status"
REVOKE = "hetfaas.admin.revoke"
SET_TENANT = "hetfaas.admin.tenant"
DRAIN = "hetfaas.admin.drain"
ALL_FUNCTIONS = "hetfaas.admin.functions"
VERIFY_ALL = "hetfaas.verify.*"
REPLICA_BEAT_ALL = "hetfaas.scheduler.*.beat"
WHERE_IS = "hetfaas.nodes.where-is"  # every node listens (no queue group)
FUNCTION_REMOVED = "hetfaas.nodes.function-removed"  # every node listens (no queue group)

# Reply subjects. A tenant's replies come to `_INBOX.<tenant>.<id>.<token>`: only that tenant (and
# the operator) may subscribe there, and a service answers a request only when its reply subject
# is the tenant's own (`is_tenant_reply`), so nobody can have another tenant's answer sent to
# them or forge one into another tenant's inbox. Services' own inboxes are `_HF.<role>.<id>`.
TENANT_INBOX_ROOT = "_INBOX"
SERVICE_INBOX_ROOT = "_HF"
# A tenant's own clients are in the tenant's own NATS account, which imports the tenant's
# subjects as services (deploy/authority.py): their requests reach the services with a reply
# subject the server made, under `_R_.`, and the server routes its answer back to the tenant's
# inbox. Only the server makes such subjects (a client may not publish with one as its reply),
# and only for requests that crossed a tenant's import of its own subjects.
IMPORT_REPLY_ROOT = "_R_"


def control(tenant: str, verb: str) -> str:
    return f"hetfaas.control.{tenant}.{verb}"


def parse_control(subject: str) -> tuple[str, str] | None:
    """(tenant, verb) of a tenant's control subject."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != ["hetfaas", "control"]:
        return None
    return parts[2], parts[3]


def verify(tenant: str) -> str:
    return f"hetfaas.verify.{tenant}"


def parse_verify(subject: str) -> str | None:
    parts = subject.split(".")
    return parts[2] if len(parts) == 3 and parts[:2] == ["hetfaas", "verify"] else None


def tenant_inbox(tenant: str) -> str:
    """The prefix of a tenant's reply subjects (its connection's inboxes live under it)."""
    return f"{TENANT_INBOX_ROOT}.{tenant}"


def service_inbox(role: str, name: str) -> str:
    return f"{SERVICE_INBOX_ROOT}.{role}.{name}"


def reply_is_the_tenants(subject: str, reply: str) -> bool:
    """For a tenant's request (`hetfaas.<kind>.<tenant>...`): whether `reply` is that tenant's,
    as the server made it for a request from the tenant's account, or in the tenant's inbox."""
    if reply.startswith(f"{IMPORT_REPLY_ROOT}.") and len(reply) > len(IMPORT_REPLY_ROOT) + 1:
        return True
    parts = subject.split(".", 3)
    return len(parts) > 2 and is_tenant_reply(parts[2], reply)


def is_tenant_reply(tenant: str, reply: str) -> bool:
    """Whether `reply` is a reply subject of `tenant`'s own (what a service answering a tenant's
    request checks before it sends anything there)."""
    prefix = f"{TENANT_INBOX_ROOT}.{tenant}."
    return reply.startswith(prefix) and len(reply) > len(prefix)


def invoke(tenant: str, function: str) -> str:
    """Clients invoke here; NATS lets a tenant publish only under its own name."""
    return f"hetfaas.invoke.{tenant}.{function}"


@lru_cache(maxsize=4096)  # checked on every invocation; the subjects in use are few
def parse_invoke(subject: str) -> tuple[str, str] | None:
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != ["hetfaas", "invoke"]:
        return None
    return parts[2], parts[3]


BATCH_TOKEN = "batch"  # the reply token of batched replies (requests' own tokens are numbers)


def batched(reply: str) -> tuple[str, str] | None:
    """(subject of batched replies, the request's token) for a reply subject
    `<inbox prefix>.<token>`: the batch goes to `<inbox prefix>.batch`. None for a reply subject
    of one token, which has no inbox to share."""
    prefix, _, token = reply.rpartition(".")
    if not prefix or not token:
        return None
    return f"{prefix}.{BATCH_TOKEN}", token


def node_invoke(node_id: str) -> str:
    return f"hetfaas.node.{node_id}.invoke"


def traces(role: str, name: str) -> str:
    """Where service `name` in `role` publishes its spans (only it may: schemas.permissions)."""
    return f"hetfaas.traces.{role}.{name}"


def heartbeat(node_id: str) -> str:
    return f"hetfaas.heartbeat.{node_id}"


def node_maps(node_id: str) -> str:
    return f"hetfaas.node.{node_id}.maps"


def node_logs(node_id: str) -> str:
    return f"hetfaas.node.{node_id}.logs"


def node_recent(node_id: str) -> str:
    """A function's last invocations on the node (`hetfaas describe`)."""
    return f"hetfaas.node.{node_id}.recent"


def node_drain(node_id: str) -> str:
    return f"hetfaas.node.{node_id}.drain"


def replica_beat(scheduler_id: str) -> str:
    return f"hetfaas.scheduler.{scheduler_id}.beat"


def replica_invoke(scheduler_id: str) -> str:
    """One replica's own invoke subject: a replica holding no share of a small limit hands the
    invocation to one that does."""
    return f"hetfaas.scheduler.{scheduler_id}.invoke"


def is_replica_invoke(subject: str) -> bool:
    return subject.startswith("hetfaas.scheduler.") and subject.endswith(".invoke")
