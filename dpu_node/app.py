"""The DPU node process: connections, registration (kind "dpu"), heartbeats, the invoke handler."""

import contextlib
import logging
import os

from dpu_node.service import DpuNode
from dpu_node.settings import DpuNodeSettings
from ebpf_runtime.programs import ProgramRuntime, trusted_keys
from fabric import bus, health, nodes
from fabric.app import ServiceApp, open_connections

log = logging.getLogger(__name__)


class DpuNodeApp(ServiceApp):
    def __init__(self, settings: DpuNodeSettings):
        super().__init__()
        self.settings = settings

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        settings = self.settings
        if os.geteuid() != 0:
            raise PermissionError("a DPU node loads eBPF programs: it needs root (CAP_BPF, CAP_NET_ADMIN)")
        trusted = trusted_keys(settings.trusted_keys)
        nc, store, tasks = await open_connections(stack, "dpu", settings.node_id, settings)
        runtime = ProgramRuntime(settings.runtime(), settings.node_id, store, trusted)
        node = self.node = DpuNode(runtime, settings.capacity)
        stack.callback(runtime.close)
        registration = nodes.register(
            stack,
            store,
            settings.node_id,
            "dpu",
            settings.capacity,
            settings.lease_ttl_s,
            partition=runtime.partition(),
            trusted_keys=list(trusted),
        )
        registration.on_taken = self.fail
        tasks.spawn(registration.run(), "registration")
        await registration.claimed()
        await runtime.start_following(tasks, settings.lease_ttl_s * 2)
        server = bus.Server(nc, max_concurrent=settings.capacity)
        stack.push_async_callback(server.close)
        await server.serve(node.routes())
        beats = nodes.send_heartbeats(nc, settings.node_id, node.heartbeat, settings.heartbeat_interval_s)
        tasks.spawn(beats, "heartbeats")
        health.READINESS.check = lambda: health.unready(nc, registration)
        log.info(
            "DPU node %s serving (%d cores; trusts %s)", settings.node_id, settings.cores, ", ".join(trusted)
        )


async def run_dpu_node(settings: DpuNodeSettings) -> None:
    await DpuNodeApp(settings).serve_forever()
