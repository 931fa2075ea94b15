"""The scheduler process: connections, background tasks and handlers, started and stopped as one."""

import contextlib
import logging

from fabric import bus, health, trace_stream
from fabric.app import ServiceApp, open_connections
from fabric.bundles import BundleStore
from scheduler import state
from scheduler.fence import Fence
from scheduler.service import Scheduler
from scheduler.settings import SchedulerSettings
from schemas import keys

log = logging.getLogger(__name__)


class SchedulerApp(ServiceApp):
    """`async with SchedulerApp(settings)` serves until the block ends; leaving it stops taking
    requests, revokes the replica's lease, cancels its tasks and drains NATS, in that order."""

    def __init__(self, settings: SchedulerSettings):
        super().__init__()
        self.settings = settings

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        settings = self.settings
        nc, store, tasks = await open_connections(stack, "scheduler", settings.scheduler_id, settings)
        scheduler = self.scheduler = Scheduler(
            settings, nc, store, BundleStore(nc.jetstream(), settings.bundle_replicas)
        )
        await scheduler.start()
        if settings.trace_stream:  # the schedulers make the stream every service publishes to
            tasks.spawn(trace_stream.keep(nc.jetstream(), settings.bundle_replicas), "trace-stream")
        registration = state.registration(store, settings.scheduler_id, settings.lease_ttl_s)
        stack.push_async_callback(registration.revoke)
        server = bus.Server(nc, settings.max_concurrent)
        stack.push_async_callback(server.close)
        stack.push_async_callback(scheduler.invoker.tasks.close)  # retries of fast-path invocations
        tasks.spawn(scheduler.sync.follow_nodes(), "follow-nodes")
        tasks.spawn(scheduler.sync.follow_functions(), "follow-functions")
        tasks.spawn(scheduler.sync.follow_tenants(), "follow-tenants")
        tasks.spawn(scheduler.sync.follow_cordons(), "follow-cordons")
        tasks.spawn(scheduler.sync.follow_schedulers(), "follow-schedulers")
        tasks.spawn(scheduler.send_beats(), "replica-beats")
        tasks.spawn(scheduler.watch_staleness(), "watch-staleness")
        await server.serve(scheduler.view_routes())
        tasks.spawn(scheduler.sync.probe_etcd(keys.scheduler(settings.scheduler_id)), "probe-etcd")
        await scheduler.wait_until_ready()
        await server.serve(scheduler.own_routes())
        fence = Fence(
            server,
            scheduler.queue_routes,
            scheduler.sync.lost_for,
            scheduler.another_has_a_live_view,
            lambda fenced: setattr(scheduler, "fenced", fenced),
        )
        await fence.serve()
        tasks.spawn(fence.run(), "fence")
        registration.on_taken = self.fail
        tasks.spawn(registration.run(), "registration")  # listed in `status` once it serves
        await registration.claimed()
        health.READINESS.check = lambda: scheduler.unready() or health.unready(nc, registration)
        log.info("scheduler %s serving", settings.scheduler_id)


async def run_scheduler(settings: SchedulerSettings) -> None:
    await SchedulerApp(settings).serve_forever()
