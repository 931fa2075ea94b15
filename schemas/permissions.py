"""What each identity may publish and subscribe to on NATS: least privilege, derived from the
subject table (docs/architecture.md §8). nats-server enforces these lists (they are in each user's
JWT); anything not allowed is denied.
"""

from typing import Literal

import msgspec

from schemas import keys, subjects

Role = Literal["operator", "tenant", "scheduler", "host", "dpu", "verifier"]
ROLES: tuple[Role, ...] = ("operator", "tenant", "scheduler", "host", "dpu", "verifier")

_BUCKET = f"OBJ_{subjects.BUNDLE_BUCKET}"
# The JetStream API calls of reading an object (nats-py's ObjectStore.get and get_info): the
# bucket's info, its metadata message, an ordered consumer over the object's chunks and its flow
# control. Writing adds creating the bucket, publishing chunks and metadata, purging replaced
# chunks. (Found by running both against a server with these lists and nothing else.)
BUNDLE_READ = (
    "$JS.API.STREAM.NAMES",  # nats-py finds the stream of a subscription by its subject
    f"$JS.API.STREAM.INFO.{_BUCKET}",
    f"$JS.API.STREAM.MSG.GET.{_BUCKET}",
    f"$JS.API.DIRECT.GET.{_BUCKET}",  # a bundle's chunks, by sequence (fabric.bundles)
    f"$JS.API.DIRECT.GET.{_BUCKET}.>",
    f"$JS.API.CONSUMER.CREATE.{_BUCKET}",
    f"$JS.API.CONSUMER.CREATE.{_BUCKET}.>",
    f"$JS.API.CONSUMER.DELETE.{_BUCKET}.>",
    f"$JS.FC.{_BUCKET}.>",
)
_TRACES = subjects.TRACES_STREAM
TRACES_READ = (  # the operator reads a planned cluster's spans back (an ordered consumer)
    "$JS.API.STREAM.NAMES",
    f"$JS.API.STREAM.INFO.{_TRACES}",
    f"$JS.API.CONSUMER.CREATE.{_TRACES}",
    f"$JS.API.CONSUMER.CREATE.{_TRACES}.>",
    f"$JS.API.CONSUMER.DELETE.{_TRACES}.>",
    f"$JS.FC.{_TRACES}.>",
)
TRACES_MAKE = (f"$JS.API.STREAM.INFO.{_TRACES}", f"$JS.API.STREAM.CREATE.{_TRACES}")  # schedulers
BUNDLE_WRITE = (
    *BUNDLE_READ,
    f"$JS.API.STREAM.CREATE.{_BUCKET}",
    f"$JS.API.STREAM.UPDATE.{_BUCKET}",  # raising its copies (fabric.bundles)
    f"$JS.API.STREAM.PURGE.{_BUCKET}",
    f"$O.{subjects.BUNDLE_BUCKET}.>",
)


class Permissions(msgspec.Struct, frozen=True):
    pub: tuple[str, ...]
    sub: tuple[str, ...]


def permissions(role: Role, name: str) -> Permissions:
    """The allow lists of identity `name` in `role` (a tenant's name is the tenant)."""
    own_inbox = f"{subjects.service_inbox(role, name)}.>"
    scheduler_inboxes = f"{subjects.SERVICE_INBOX_ROOT}.scheduler.>"
    tenant_inboxes = f"{subjects.TENANT_INBOX_ROOT}.>"
    tenant_replies = f"{subjects.IMPORT_REPLY_ROOT}.>"  # answers crossing back to tenants' accounts
    if role == "tenant":
        return Permissions(
            pub=(subjects.invoke(name, "*"), subjects.control(name, "*"), subjects.verify(name)),
            sub=(f"{subjects.tenant_inbox(name)}.>",),
        )
    if role == "operator":  # acts for any tenant, alone manages tenants and revocations, watches
        return Permissions(
            pub=(
                subjects.INVOKE_ALL,
                subjects.CONTROL_ALL,
                subjects.VERIFY_ALL,
                "hetfaas.admin.*",
                *TRACES_READ,
                subjects.traces("operator", name),
            ),
            sub=(tenant_inboxes, own_inbox, subjects.HEARTBEAT_ALL),
        )
    if role == "scheduler":
        return _scheduler(name, own_inbox, scheduler_inboxes, tenant_inboxes, tenant_replies)
    if role in ("host", "dpu"):  # a node: answers callers and schedulers, states only its own beat
        reads = BUNDLE_READ if role == "host" else ()
        return Permissions(
            pub=(
                subjects.heartbeat(name),
                tenant_inboxes,
                tenant_replies,
                scheduler_inboxes,
                subjects.traces(role, name),
                *reads,
            ),
            sub=(f"hetfaas.node.{name}.>", subjects.WHERE_IS, subjects.FUNCTION_REMOVED, own_inbox),
        )
    if role == "verifier":
        return Permissions(
            pub=(
                tenant_inboxes,
                tenant_replies,
                f"{subjects.SERVICE_INBOX_ROOT}.operator.>",
                subjects.traces(role, name),
            ),
            sub=(subjects.VERIFY_ALL, own_inbox),
        )
    raise ValueError(f"unknown role {role!r}")


def _scheduler(
    name: str, own_inbox: str, scheduler_inboxes: str, tenant_inboxes: str, tenant_replies: str
) -> Permissions:
    """A replica: takes the queue group's requests, forwards to nodes, asks every node and
    replica where an invocation is, answers callers, writes bundles, makes the trace stream."""
    return Permissions(
        pub=(
            subjects.node_invoke("*"),
            subjects.node_logs("*"),
            subjects.node_recent("*"),
            subjects.node_maps("*"),
            subjects.node_drain("*"),
            subjects.WHERE_IS,
            subjects.FUNCTION_REMOVED,
            subjects.replica_beat(name),
            subjects.replica_invoke("*"),
            tenant_inboxes,  # answers to tenants (checked: `subjects.reply_is_the_tenants`)
            tenant_replies,
            f"{subjects.SERVICE_INBOX_ROOT}.operator.>",
            scheduler_inboxes,  # where-is answers to the other replicas
            *BUNDLE_WRITE,
            *TRACES_MAKE,
            subjects.traces("scheduler", name),
        ),
        sub=(
            subjects.INVOKE_ALL,
            subjects.CONTROL_ALL,
            "hetfaas.admin.*",
            subjects.HEARTBEAT_ALL,
            subjects.REPLICA_BEAT_ALL,
            subjects.WHERE_IS,
            subjects.replica_invoke(name),
            own_inbox,
        ),
    )


class KeyGrant(msgspec.Struct, frozen=True):
    """One etcd permission: `key` alone, or with `prefix` every key under it; read, or with
    `write` read and write."""

    key: str
    prefix: bool = False
    write: bool = False


def etcd_grants(role: Role, name: str) -> tuple[KeyGrant, ...]:
    """What identity `name` in `role` may read and write in etcd (its etcd role; etcd denies the
    rest). Tenants and verifiers never reach etcd; the operator is etcd's root."""
    if role == "scheduler":
        return (
            KeyGrant(keys.NODES, prefix=True),
            KeyGrant(keys.SCHEDULERS, prefix=True),
            KeyGrant(keys.scheduler(name), write=True),
            KeyGrant(keys.FUNCTIONS, prefix=True, write=True),
            KeyGrant(keys.PROGRAMS, prefix=True, write=True),
            KeyGrant(keys.REVOKED, prefix=True, write=True),
            KeyGrant(keys.TENANTS, prefix=True, write=True),
            KeyGrant(keys.CORDONS, prefix=True, write=True),
        )
    if role in ("host", "dpu"):  # its own registration; the approvals and revocations it follows
        return (
            KeyGrant(keys.node(name), write=True),
            KeyGrant(keys.PROGRAMS, prefix=True),
            KeyGrant(keys.REVOKED, prefix=True),
        )
    if role in ("tenant", "verifier", "operator"):
        return ()
    raise ValueError(f"unknown role {role!r}")
