"""The host node process: connections, registration, background tasks and the invoke handler."""

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from ebpf_runtime.programs import ProgramRuntime, partition_of, trusted_keys
from fabric import bus, health, nodes, telemetry
from fabric.app import ServiceApp, open_connections
from fabric.bundles import BundleStore
from fabric.store import Store
from fabric.tasks import TaskSet
from host_node import function_logs
from host_node.bundle_cache import BundleCache
from host_node.kernel_probe import KernelProbe
from host_node.sandbox.agent import ShardedSpawner
from host_node.service import HostNode
from host_node.settings import HostNodeSettings
from host_node.spawner import PlainSpawner, Spawner

log = logging.getLogger(__name__)


class HostNodeApp(ServiceApp):
    """`async with HostNodeApp(settings)` serves until the block ends; leaving it stops taking
    invocations, lets running ones finish (shutdown_grace_s), revokes the lease, stops the
    instances and drains NATS."""

    def __init__(self, settings: HostNodeSettings):
        super().__init__()
        self.settings = settings

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        settings = self.settings
        nc, store, tasks = await open_connections(stack, "host", settings.node_id, settings)
        # The id first: a second node with it must not touch this one's cgroups or bundles.
        # (Schedulers place nothing here before the heartbeats, which start once it serves.)
        registration = nodes.register(
            stack,
            store,
            settings.node_id,
            "host",
            settings.capacity,
            settings.lease_ttl_s,
            memory_mb=settings.memory_mb,
            partition=partition_of(settings.ebpf) if settings.ebpf else None,
            trusted_keys=list(trusted_keys(settings.ebpf.trusted_keys)) if settings.ebpf else [],
        )
        registration.on_taken = self.fail
        tasks.spawn(registration.run(), "registration")
        await registration.claimed()
        bundles = BundleCache(BundleStore(nc.jetstream()), Path(settings.work_dir) / "bundles")
        spawner = await open_spawner(settings, stack)
        programs = await open_programs(settings, store, tasks, stack)
        probe = await open_probe(settings, stack)
        server = bus.Server(nc, max_concurrent=settings.capacity * 2)
        node = self.node = HostNode(settings, bundles, spawner, server.respond, programs, probe)
        stack.push_async_callback(node.close)  # after the server stops and the lease is revoked
        stack.push_async_callback(server.close, settings.shutdown_grace_s)
        await server.serve(node.routes())
        beats = nodes.send_heartbeats(nc, settings.node_id, node.heartbeat, settings.heartbeat_interval_s)
        tasks.spawn(beats, "heartbeats")
        tasks.spawn(node.runtime.reap_idle(), "reap-idle")
        if settings.python_stem_cells > 0:
            tasks.spawn(node.runtime.stems.keep_stocked(), "stem-cells")
        tasks.spawn(
            function_logs.keep_bounded(node.logs, settings.max_log_bytes, node.log_clock), "function-logs"
        )
        health.READINESS.check = lambda: health.unready(nc, registration)
        log.info("host node %s serving", settings.node_id)


async def open_probe(settings: HostNodeSettings, stack: contextlib.AsyncExitStack) -> KernelProbe | None:
    """bcc's tracepoint programs for cold starts' kernel events, when traces are recorded and
    the node may load them (root). Compiling takes about a second: off the event loop."""
    if not (settings.kernel_tracing and telemetry.enabled()):
        return None
    if os.geteuid() != 0:
        log.info("kernel phases off: bcc's tracepoint programs need root")
        return None
    probe = await asyncio.to_thread(KernelProbe.start)
    if probe is not None:
        stack.callback(probe.close)
        log.info("kernel phases on: cgroup and sched tracepoints attached (bcc)")
    return probe


async def open_programs(
    settings: HostNodeSettings, store: Store, tasks: TaskSet, stack: contextlib.AsyncExitStack
) -> ProgramRuntime | None:
    """The eBPF program runtime, when this host is configured to take eBPF functions."""
    if settings.ebpf is None:
        return None
    if os.geteuid() != 0:
        raise PermissionError("[ebpf] on a host node loads eBPF programs: it needs root (CAP_BPF)")
    trusted = trusted_keys(settings.ebpf.trusted_keys)
    runtime = ProgramRuntime(settings.ebpf, settings.node_id, store, trusted)
    stack.callback(runtime.close)
    await runtime.start_following(tasks, settings.lease_ttl_s * 2)
    return runtime


async def open_spawner(settings: HostNodeSettings, stack: contextlib.AsyncExitStack) -> Spawner:
    """The sandbox shards (or plain processes); closed after the instances are stopped, and on a
    clean stop every cgroup of ours is removed (after a crash they stay, for the next start to adopt)."""
    if settings.sandbox.mode == "plain":
        log.warning("sandbox mode 'plain': functions run unsandboxed, as this node's user")
        return PlainSpawner()
    spawner = ShardedSpawner(settings.sandbox, settings.node_id, Path(settings.work_dir))
    stack.callback(spawner.remove_all_slots)
    stack.push_async_callback(spawner.close)
    await spawner.open()
    return spawner


async def run_host_node(settings: HostNodeSettings) -> None:
    await HostNodeApp(settings).serve_forever()
