"""A replica cut off from etcd stops taking work from the queue group while another can take it.

Its view (nodes, functions, tenants, revocations) stops following etcd the moment it is cut off:
it would place on nodes that are gone and run functions that were removed or changed. So once
etcd has been lost to it for FENCE_AFTER_S, and another replica beats with a live view, it
unsubscribes from the queue group's subjects (invocations, status, control): NATS hands them to
the others. It still beats (saying it is fenced, so `status` shows it) and still answers what is
addressed to it by name. With its view fresh again it subscribes again. When every replica is
cut off, none fences: a stale view serves warm invocations better than no scheduler at all."""

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from fabric import bus

log = logging.getLogger(__name__)

FENCE_AFTER_S = 3.0  # longer than an etcd leader election, so a cluster's ride through it
CHECK_S = 0.5


def should_fence(fenced: bool, lost_for: float | None, another_has_a_live_view: bool) -> bool:
    """Fenced from now on? Until the view is fresh again, or no other replica can take the work
    (it died, or lost etcd too). Pure."""
    if lost_for is None or not another_has_a_live_view:
        return False
    return fenced or lost_for >= FENCE_AFTER_S


class Fence:
    def __init__(
        self,
        server: bus.Server,
        routes: Callable[[], list[bus.Route]],
        lost_for: Callable[[float], float | None],
        another_has_a_live_view: Callable[[], bool],
        on_change: Callable[[bool], None],
    ):
        self._server = server
        self._on_change = on_change
        self._routes = routes  # the queue group's routes
        self._lost_for = lost_for
        self._another = another_has_a_live_view
        self._subscriptions: list[Any] = []
        self.fenced = False

    async def serve(self) -> None:
        self._subscriptions = await self._server.serve(self._routes())

    async def run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_S)
            lost_for = self._lost_for(time.monotonic())
            fence = should_fence(self.fenced, lost_for, self._another())
            if fence and not self.fenced:
                log.error(
                    "etcd lost for %.1f s: taking no work from the queue group until it is back", lost_for
                )
                self._set(True)
                await self._server.stop_serving(self._subscriptions)
                self._subscriptions = []
            elif self.fenced and not fence:
                try:
                    await self.serve()
                except Exception as exc:  # NATS gone meanwhile: the next check tries again
                    log.warning("cannot take work from the queue group again yet: %s", exc)
                    continue
                log.warning("etcd is back and the view fresh: taking work from the queue group again")
                self._set(False)

    def _set(self, fenced: bool) -> None:
        self.fenced = fenced
        self._on_change(fenced)
