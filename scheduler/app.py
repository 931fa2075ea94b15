"""The scheduler process: connections, background tasks and handlers, started and stopped as one."""

import asyncio
import contextlib
import logging
import os
import socket
import time

from fabric import bus
from fabric.bundles import BundleStore
from fabric.store import Store
from fabric.tasks import TaskSet
from fabric.telemetry import setup_tracing
from scheduler.service import Scheduler
from scheduler.settings import SchedulerSettings
from schemas import codec, keys
from schemas.messages import SchedulerRecord

log = logging.getLogger(__name__)


class SchedulerApp(contextlib.AbstractAsyncContextManager):
    """`async with SchedulerApp(settings)` serves until the block ends; leaving it stops taking
    requests, revokes the replica's lease, cancels its tasks and drains NATS, in that order."""

    def __init__(self, settings: SchedulerSettings):
        self.settings = settings
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> "SchedulerApp":
        try:
            await self._start(self._stack)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        settings = self.settings
        provider = setup_tracing(settings.scheduler_id, settings.state_dir, settings.tracing)
        if provider is not None:
            stack.callback(provider.shutdown)
        nc = await bus.connect(settings.nats_url, settings.scheduler_id)
        stack.push_async_callback(bus.close, nc)
        store = await stack.enter_async_context(Store(settings.etcd_endpoints))
        tasks = TaskSet()
        stack.push_async_callback(tasks.close)
        scheduler = self.scheduler = Scheduler(settings, nc, store, BundleStore(nc.jetstream()))
        await scheduler.start()
        record = SchedulerRecord(
            scheduler_id=settings.scheduler_id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            started_at=time.time(),
        )
        registration = store.leased_key(
            keys.scheduler(settings.scheduler_id), lambda: codec.encode(record), settings.lease_ttl_s
        )
        stack.push_async_callback(registration.revoke)
        server = bus.Server(nc, settings.max_concurrent)
        stack.push_async_callback(server.close)
        tasks.spawn(scheduler.sync.follow_nodes(), "follow-nodes")
        tasks.spawn(scheduler.sync.follow_functions(), "follow-functions")
        tasks.spawn(scheduler.watch_staleness(), "watch-staleness")
        await server.serve(scheduler.view_routes())
        await scheduler.wait_until_ready()
        await server.serve(scheduler.request_routes())
        tasks.spawn(registration.run(), "registration")  # listed in `status` once it serves
        log.info("scheduler %s serving", settings.scheduler_id)


async def run_scheduler(settings: SchedulerSettings) -> None:
    async with SchedulerApp(settings):
        await asyncio.Future()
