"""What the agent tells a shard process when it starts it (as JSON on its command line)."""

import msgspec

from host_node.sandbox import init
from host_node.sandbox.cgroups import Layout, Limits
from host_node.sandbox.pool import PoolSettings
from schemas.messages import PoolMode


class ShardConfig(msgspec.Struct, frozen=True, kw_only=True):
    shard: int
    mode: PoolMode
    layout: Layout
    plan: init.RootPlan
    pool: PoolSettings
    idle_limits: Limits  # what an idle slot (or a prewarmed sandbox) is held to
    userns_base_uid: int  # 0: no user namespace; else sandbox ids 0..65535 are host ids base+0..
