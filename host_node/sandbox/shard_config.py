"""What the agent tells a shard process when it starts it (as JSON on its command line)."""

import msgspec

from host_node.sandbox import init
from host_node.sandbox.cgroups import Layout, Limits
from host_node.sandbox.ids import IdRange
from host_node.sandbox.pool import PoolSettings
from schemas.messages import PoolMode


class ShardConfig(msgspec.Struct, frozen=True, kw_only=True):
    shard: int
    mode: PoolMode
    layout: Layout
    plan: init.RootPlan
    pool: PoolSettings
    idle_limits: Limits  # what an idle slot (or a prewarmed sandbox) is held to
    userns: bool  # each sandbox in a user namespace of its own (owned by the sandbox's host uid)
    ids: IdRange  # the host uids this shard's sandboxes run as, one per live sandbox
