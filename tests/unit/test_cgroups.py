"""Where our cgroup subtree goes, from /proc/self/mountinfo: pure v2, hybrid, v1."""

import pytest

from host_node.sandbox.cgroups import CgroupError, parse_mountinfo, plan_layout
from host_node.sandbox.settings import SandboxSettings

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PURE_V2 = "30 23 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"
V1_COMBINED = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"


def test_hybrid_hosts_put_limits_in_v1_and_processes_in_cgroup2_too() -> None:
    layout = plan_layout(parse_mountinfo(HYBRID), {"hugetlb"}, "hetfaas-x", "host-1")

    assert layout.kind == "hybrid"
    assert layout.v2_root == "/sys/fs/cgroup/unified/hetfaas-x/hetfaas.host-1"
    assert layout.v1_roots == {
        "memory": "/sys/fs/cgroup/memory/hetfaas-x/hetfaas.host-1",
        "cpu": "/sys/fs/cgroup/cpu/hetfaas-x/hetfaas.host-1",
        "pids": "/sys/fs/cgroup/pids/hetfaas-x/hetfaas.host-1",
    }


def test_pure_v2_hosts_use_cgroup2_alone() -> None:
    layout = plan_layout(parse_mountinfo(PURE_V2), {"cpu", "memory", "pids", "io"}, "", "n")
    assert (layout.kind, layout.v2_root, layout.v1_roots) == ("v2", "/sys/fs/cgroup/hetfaas.n", {})


def test_a_missing_controller_is_named() -> None:
    with pytest.raises(CgroupError, match="memory controller"):
        plan_layout(parse_mountinfo(V1_COMBINED), set(), "", "n")


def test_mountinfo_parsing_skips_other_filesystems_and_reads_combined_controllers() -> None:
    mounts = parse_mountinfo(HYBRID + V1_COMBINED)
    assert ("/sys/fs/cgroup/cpu,cpuacct", "cgroup", {"rw", "cpu", "cpuacct"}) in mounts
    assert all(fstype in ("cgroup", "cgroup2") for _, fstype, _ in mounts)


@pytest.mark.parametrize(
    ("memory_mb", "cpu_millis"),
    [(128, 1000), (1024, 1000), (1536, 1500), (16384, 2000)],  # at least 1 CPU, at most all (2 here)
)
def test_size_classes(memory_mb: int, cpu_millis: int, monkeypatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    limits = SandboxSettings().limits_for(memory_mb)
    assert (limits.memory_mb, limits.cpu_millis, limits.pids_max) == (memory_mb, cpu_millis, 256)
