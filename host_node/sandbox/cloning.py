"""Cloning a sandbox in a shard process: clone3 into new namespaces (straight into the slot's
cgroup2 where allowed), the child's own setup up to exec'ing hetfaas-waiter, and handing a
launch to the waiter. Single-threaded callers only (setns and clone3, see shard.py)."""

import os
import signal
import socket

from host_node.sandbox import cgroups, init, linux, protocol
from host_node.sandbox.cgroups import Slot
from host_node.sandbox.shard_config import ShardConfig

NAMESPACES = (
    linux.CLONE_NEWNS | linux.CLONE_NEWPID | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS | linux.CLONE_NEWNET
)


def clone(
    config: ShardConfig, slot: Slot, into_cgroup: bool, uid: int
) -> tuple[int, int, socket.socket, socket.socket]:
    """clone3 a child into new namespaces (and, when allowed, straight into the slot's cgroup2).
    Returns pid 0 in the child, which closes the inherited fds and joins the rest of its
    cgroups itself, except in a user namespace: then the parent maps its ids and attaches it
    (the child has no rights over the host's cgroup files), then tells it to go on.

    The user namespace is made with the sandbox's own host `uid` as its effective uid, which
    makes that uid its owner: the kernel charges what it counts per user up the namespace chain
    to the owner (ids.py), so this sandbox's counts are its own and not the host root's."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    cgroup_fd = -1
    flags = NAMESPACES | (linux.CLONE_NEWUSER if config.userns else 0)
    try:
        cgroup_fd = slot.open_v2() if into_cgroup and slot.v2_dir else -1
        pid, pidfd = _clone3_owned(flags, cgroup_fd, uid) if config.userns else linux.clone3(flags, cgroup_fd)
    except OSError:
        close_all([parent.detach(), child.detach()] + ([cgroup_fd] if cgroup_fd >= 0 else []))
        raise
    if pid == 0:
        return pid, pidfd, parent, child
    if cgroup_fd >= 0:
        os.close(cgroup_fd)
    if config.userns:
        try:
            init.map_ids(pid, config.ids.root, uid, config.plan)
            for path in slot.procs_files(include_v2=cgroup_fd < 0):
                cgroups.attach(path, pid)
            parent.send(init.GO)
        except OSError:
            os.kill(pid, signal.SIGKILL)  # on_exit reaps it and reports why
    return pid, pidfd, parent, child


def _clone3_owned(flags: int, cgroup_fd: int, uid: int) -> tuple[int, int]:
    """clone3 with `uid` as the effective uid (so it owns the new user namespace) and the
    filesystem uid kept 0 (so clone3 may still write the slot's root-owned cgroup.procs)."""
    linux.act_as_owner(uid)
    try:
        pid, pidfd = linux.clone3(flags, cgroup_fd)
    except OSError:
        os.seteuid(0)
        raise
    if pid:
        os.seteuid(0)  # the child stays the owner until its namespace's ids are mapped
    return pid, pidfd


def child_attach_files(config: ShardConfig, slot: Slot, cloned_into: bool) -> list[str]:
    """The cgroups the child joins by itself (none in a user namespace: the parent does it)."""
    if config.userns:
        return []
    return slot.procs_files(include_v2=not cloned_into)


def child_main(config: ShardConfig, status: socket.socket, attach_files: list[str], announce: bool) -> None:
    """In the clone: build the sandbox, (announce it is ready,) become hetfaas-waiter."""
    try:
        init.close_inherited([status.fileno()])
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        if config.userns:
            if status.recv(16) != init.GO:
                os._exit(1)  # the parent could not map our ids: it kills us anyway
        init.prepare(config.plan, attach_files, userns=config.userns)
        if config.userns:
            # Only now: with the host's uid 0 as our filesystem uid we could still walk the
            # host's 0700 directories to the template (e.g. under /root); inside, that is moot.
            init.become_namespace_root()
        if announce:
            init.report(status, init.READY)
    except BaseException as exc:
        init.fail(status, f"sandbox setup failed: {exc}")
    init.exec_waiter(status)


def send_activation(
    config: ShardConfig,
    uid: int,
    pid: int,
    status: socket.socket,
    launch: protocol.Launch,
    trees: tuple[int, int],
    fds: list[int],
    own_mount_ns: int,
) -> None:
    """Hand the launch to the sandbox's hetfaas-waiter (at `status`). `trees` are the code's and
    the dependency layer's mount trees (-1: none; a stem cell has neither yet). In a user
    namespace they are mounted from here: the kernel lets no namespace-root move a host-owned
    mount in itself. The function runs as the sandbox's own host `uid`: in a user namespace
    through the plan's uid, which maps to it; without one directly."""
    code_tree, deps_tree = trees
    if config.userns:
        mount_trees(own_mount_ns, pid, [(code_tree, init.CODE_VIEW), (deps_tree, init.DEPS_VIEW)])
        plan = config.plan
        data = init.activation(plan, launch.argv, launch.env, plan.uid, plan.gid, init.CODE_MOUNTED)
        protocol.send_bytes(status, data, fds)
    else:
        flags = (init.CODE_MOUNTED if code_tree < 0 else 0) | (init.DEPS_TREE if deps_tree >= 0 else 0)
        data = init.activation(config.plan, launch.argv, launch.env, uid, uid, flags)
        protocol.send_bytes(status, data, [tree for tree in trees if tree >= 0] + fds)


def mount_trees(own_mount_ns: int, pid: int, trees: list[tuple[int, str]]) -> None:
    """Enter the sandbox's mount namespace (this process is single-threaded: setns is safe),
    attach each tree (an fd of -1 is none) at its path, and come back."""
    trees = [(tree, at) for tree, at in trees if tree >= 0]
    if not trees:
        return
    target = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        linux.setns(target, linux.CLONE_NEWNS)
        try:
            for tree, at in trees:
                linux.move_mount(tree, at)
        finally:
            linux.setns(own_mount_ns, linux.CLONE_NEWNS)
    finally:
        os.close(target)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
