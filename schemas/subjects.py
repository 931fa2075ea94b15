"""The subject table. Nobody writes a subject string anywhere else (docs/architecture.md §3)."""

from functools import lru_cache

SCHEDULER_QUEUE = "hetfaas-scheduler"
VERIFIER_QUEUE = "hetfaas-verifier"
BUNDLE_BUCKET = "hetfaas-bundles"

INVOKE_ALL = "hetfaas.invoke.*.*"
HEARTBEAT_ALL = "hetfaas.heartbeat.*"
DEPLOY = "hetfaas.control.deploy"
REMOVE = "hetfaas.control.remove"
LOGS = "hetfaas.control.logs"
LIST_FUNCTIONS = "hetfaas.control.functions"
STATUS = "hetfaas.control.status"
VERIFY = "hetfaas.verify"
MAPS = "hetfaas.control.maps"
REVOKE = "hetfaas.control.revoke"
SET_TENANT = "hetfaas.control.tenant"
REPLICA_BEAT_ALL = "hetfaas.scheduler.*.beat"
WHERE_IS = "hetfaas.nodes.where-is"  # every node listens (no queue group)
FUNCTION_REMOVED = "hetfaas.nodes.function-removed"  # every node listens (no queue group)


def invoke(tenant: str, function: str) -> str:
    """Clients invoke here; the tenant in the subject allows per-tenant NATS permissions later."""
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


def heartbeat(node_id: str) -> str:
    return f"hetfaas.heartbeat.{node_id}"


def node_maps(node_id: str) -> str:
    return f"hetfaas.node.{node_id}.maps"


def node_logs(node_id: str) -> str:
    return f"hetfaas.node.{node_id}.logs"


def replica_beat(scheduler_id: str) -> str:
    return f"hetfaas.scheduler.{scheduler_id}.beat"


def replica_invoke(scheduler_id: str) -> str:
    """One replica's own invoke subject: a replica holding no share of a small limit hands the
    invocation to one that does."""
    return f"hetfaas.scheduler.{scheduler_id}.invoke"


def is_replica_invoke(subject: str) -> bool:
    return subject.startswith("hetfaas.scheduler.") and subject.endswith(".invoke")
