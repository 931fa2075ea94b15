"""Picking one start's kernel events out of everything the tracepoints saw. Pure."""

from host_node.kernel_probe import KernelEvent, select


def event(at: int, tracepoint: str, pid: int = 0, path: str = "") -> KernelEvent:
    return KernelEvent(at, tracepoint, pid, 0, "python3", path)


def test_a_starts_events_are_its_processes_and_its_slots() -> None:
    seen = [
        event(5, "sched_process_exec", pid=42),  # before the start
        event(10, "cgroup_mkdir", path="/hetfaas-abc/hetfaas.host-1/s0-4"),
        event(11, "cgroup_mkdir", path="/hetfaas-abc/hetfaas.host-2/s0-4"),  # another node's slot
        event(12, "sched_process_fork", pid=42),
        event(13, "cgroup_attach_task", pid=42, path="/hetfaas-abc/hetfaas.host-1/s0-4"),
        event(14, "sched_process_exec", pid=43),  # another process
        event(15, "sched_process_exec", pid=42),
        event(16, "cgroup_mkdir", path="/other-software/s0-4"),  # not ours
    ]
    chosen = select(seen, pid=42, node_id="host-1", slot="s0-4", since_mono_ns=10)
    assert [(e.at_mono_ns, e.tracepoint) for e in chosen] == [
        (10, "cgroup_mkdir"),
        (12, "sched_process_fork"),
        (13, "cgroup_attach_task"),
        (15, "sched_process_exec"),
    ]
