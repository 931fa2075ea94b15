import os
from pathlib import Path
from typing import get_args

import msgspec

from host_node.sandbox.cgroups import Limits
from host_node.sandbox.pool import PoolSettings
from schemas.messages import SandboxMode

MODES: tuple[SandboxMode, ...] = get_args(SandboxMode)


class SandboxSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a host node starts functions. `plain` is unsandboxed child processes (development
    without root); `naive`, `pool` and `prewarm` are the secure sandbox with the cgroup work done
    per start, from pre-created slots, or from pre-created sandboxes waiting to exec."""

    mode: SandboxMode = "prewarm"
    shards: int = 0  # 0: one per CPU
    cgroup_parent: str = ""  # our subtree hetfaas.<node_id> goes under this path in every hierarchy
    user_namespace: str = "auto"  # auto (where the kernel allows) | on | off
    userns_base_uid: int = 100000  # in a user namespace, sandbox ids 0..65535 are host ids base+0..
    uid: int = 65534  # functions run as this unprivileged user
    gid: int = 65534
    pids_max: int = 256
    tmp_size_mb: int = 64
    nofile: int = 1024
    memory_mb_per_cpu: int = 1024  # CPU limit grows with memory: 1024 MB = 1 CPU ...
    min_cpu_millis: int = 1000  # ... but never below this (a runtime's init is CPU-bound)
    idle_memory_mb: int = 128  # the size class idle slots and prewarmed sandboxes wait in
    pool: PoolSettings = PoolSettings()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"sandbox mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.user_namespace not in ("auto", "on", "off"):
            raise ValueError(f"user_namespace {self.user_namespace!r} is not one of auto, on, off")

    def limits_for(self, memory_mb: int) -> Limits:
        """A function's size class: its memory, and CPU in proportion to it (as Lambda does)."""
        cpu_millis = memory_mb * 1000 // self.memory_mb_per_cpu
        cpu_millis = max(self.min_cpu_millis, min(cpu_millis, 1000 * (os.cpu_count() or 1)))
        return Limits(memory_mb, cpu_millis, self.pids_max)

    def userns_base(self) -> int:
        """The host id sandbox id 0 maps to; 0 when sandboxes get no user namespace."""
        if self.user_namespace == "off":
            return 0
        allowed = Path("/proc/sys/user/max_user_namespaces").read_text().strip() != "0"
        if self.user_namespace == "on" and not allowed:
            raise ValueError("user_namespace = 'on', but this kernel allows no user namespaces")
        return self.userns_base_uid if allowed else 0

    def shard_count(self) -> int:
        return self.shards or os.cpu_count() or 1
