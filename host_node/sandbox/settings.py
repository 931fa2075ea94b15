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
    # Host uids from here are the sandboxes': each node on a machine claims a block of 65536
    # (host_node.sandbox.ids), whose first is every sandbox's namespace root and the rest one
    # per live sandbox.
    sandbox_uid_base: int = 100000
    uid: int = 65534  # functions run as this unprivileged user
    gid: int = 65534
    pids_max: int = 256
    tmp_size_mb: int = 64
    nofile: int = 1024
    # What one sandbox may hold of what the kernel counts per user (set in its user namespace;
    # the host's per-user limits, counted for the sandbox's own uid, apply as well).
    inotify_instances: int = 128
    inotify_watches: int = 8192
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

    def use_user_namespaces(self) -> bool:
        if self.user_namespace == "off":
            return False
        allowed = Path("/proc/sys/user/max_user_namespaces").read_text().strip() != "0"
        if self.user_namespace == "on" and not allowed:
            raise ValueError("user_namespace = 'on', but this kernel allows no user namespaces")
        return allowed

    def own_counts(self) -> dict[str, int]:
        """/proc/sys/user limits in each sandbox's user namespace. A function makes no user
        namespace (without one it has no capability to make any other kind) and no fanotify
        group: seccomp refuses the calls, and these hold past it. Each write is on the start's
        path in pool and naive modes, hence four and not all twelve."""
        counts = {"max_user_namespaces": 0, "max_fanotify_groups": 0}
        counts |= {
            "max_inotify_instances": self.inotify_instances,
            "max_inotify_watches": self.inotify_watches,
        }
        return {name: value for name, value in counts.items() if os.path.exists(f"/proc/sys/user/{name}")}

    def shard_count(self) -> int:
        return self.shards or os.cpu_count() or 1
