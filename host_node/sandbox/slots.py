"""A shard's stock of cgroup slots: taking one for a sandbox (or creating it inline when the
pool is empty), sizing it, recycling it once its sandbox is gone, refilling free ones ahead of
demand, and adopting what a crashed node left. Runs inside the single-threaded shard process."""

import logging
import os
import select
import time
from collections.abc import Callable
from functools import partial

from host_node.sandbox import cgroups
from host_node.sandbox.cgroups import Limits, Slot
from host_node.sandbox.pool import RefillPlanner, SlotPool
from host_node.sandbox.shard_config import ShardConfig

log = logging.getLogger("hetfaas.shard")

RECYCLE_RETRY_S = 0.01
RECYCLE_GIVE_UP_S = 5.0

Watch = Callable[[int, int, Callable[[int], None]], None]  # fd, poll events, handler


class SlotStock:
    def __init__(self, config: ShardConfig, watch: Watch, unwatch: Callable[[int], None], now: float):
        self.config = config
        self._watch = watch
        self._unwatch = unwatch
        self.pool = SlotPool(config.shard)
        self.planner = RefillPlanner(config.pool, now)
        self.limits: dict[str, Limits] = {}  # slot name -> the size class it holds
        self.recycling: dict[str, tuple[Slot, float, int | None]] = {}

    def acquire(self, limits: Limits) -> tuple[Slot, bool]:
        """A slot with `limits` applied: from the pool, else created inline. (slot, reused)"""
        layout = self.config.layout
        if self.config.mode != "naive":
            while (name := self.pool.take()) is not None:
                slot = layout.slot(name)
                try:
                    if not slot.exists():  # another cgroup manager pruned it while it was empty
                        raise FileNotFoundError(name)
                    self.set_limits(slot, limits)
                    return slot, True
                except FileNotFoundError:
                    log.warning("shard %d: slot %s vanished; replacing it", self.config.shard, name)
                    slot.remove()
                    self.forget(name, vanished=True)
        slot = layout.slot(self.pool.new_name(naive=self.config.mode == "naive"))
        slot.create()
        self.pool.mark_busy(slot.name, inline=self.config.mode != "naive")
        self.set_limits(slot, limits)
        return slot, False

    def set_limits(self, slot: Slot, limits: Limits) -> None:
        """Apply a size class, writing only the limits that change (the slot's are remembered)."""
        try:
            slot.apply(limits, self.limits.get(slot.name))
        except BaseException:
            self.limits.pop(slot.name, None)  # unknown now: the next apply writes everything
            raise
        self.limits[slot.name] = limits

    def forget(self, name: str, vanished: bool) -> None:
        self.pool.drop(name, vanished)
        self.limits.pop(name, None)

    def create_free(self) -> None:
        slot = self.config.layout.slot(self.pool.new_name())
        slot.create()
        self.set_limits(slot, self.config.idle_limits)
        self.pool.add_free(slot.name, recycled=False)

    def recycle(self, slot: Slot, ran_launch: bool) -> None:
        """After a sandbox's init is reaped: its pid namespace took every process with it, so the
        slot is usually empty at once; a sweep (and waiting on cgroup.events) covers the rest."""
        self.recycling[slot.name] = (slot, time.monotonic(), None)
        if ran_launch:
            self.pool.released += 1  # counted now: "every launch so far has ended" is then exact
        if slot.populated():
            slot.kill()
        self.try_finish_recycle(slot)

    def _recycle_event(self, slot: Slot, _events: int) -> None:
        self.try_finish_recycle(slot)

    def try_finish_recycle(self, slot: Slot) -> None:
        if slot.populated():
            if self.recycling[slot.name][2] is None and (fd := slot.events_fd()) is not None:
                self.recycling[slot.name] = (*self.recycling[slot.name][:2], fd)
                self._watch(fd, select.POLLPRI, partial(self._recycle_event, slot))
            return
        _, _, fd = self.recycling.pop(slot.name)
        if fd is not None:
            self._unwatch(fd)
            os.close(fd)
        if self.config.mode == "naive" or not slot.is_clean():
            slot.remove()
            self.forget(slot.name, vanished=False)
            return
        try:
            self.set_limits(slot, self.config.idle_limits)
        except FileNotFoundError:
            self.forget(slot.name, vanished=True)
            return
        self.pool.add_free(slot.name, recycled=True)

    def retry_recycling(self, now: float) -> None:
        for name, (slot, since, _fd) in list(self.recycling.items()):
            if now - since > RECYCLE_GIVE_UP_S:
                log.error(
                    "shard %d: slot %s stays populated; removing it from the pool", self.config.shard, name
                )
                slot.kill()
                self.recycling.pop(name)
                self.forget(name, vanished=False)
                continue
            slot.kill()
            self.try_finish_recycle(slot)

    def refill(self, now: float) -> None:
        """Create free slots as the planner says, unless the kernel has too many dying cgroups."""
        if count := self.planner.plan(len(self.pool.free), now):
            if cgroups.nr_dying(self.config.layout) < self.config.pool.max_dying:
                for _ in range(count):
                    self.create_free()

    def adopt_leftovers(self) -> None:
        """Slots of this shard left by a crashed node: kill what runs in them, keep the clean ones."""
        mine = [
            n for n in cgroups.list_slots(self.config.layout) if n.split("-")[0][1:] == str(self.config.shard)
        ]
        for name in sorted(mine):
            slot = self.config.layout.slot(name)
            slot.kill()
            if name.startswith("s") and _wait_empty(slot) and slot.is_clean():
                self.set_limits(slot, self.config.idle_limits)
                self.pool.adopt(name)
            else:
                slot.destroy()


def _wait_empty(slot: Slot, timeout_s: float = 2.0) -> bool:
    """Start-up only (adopting leftovers): block until the slot's cgroup has no process."""
    fd = slot.events_fd()
    poller = select.poll()
    if fd is not None:
        poller.register(fd, select.POLLPRI)
    deadline = time.monotonic() + timeout_s
    try:
        while slot.populated():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(min(left, RECYCLE_RETRY_S) * 1000)  # events, or a v1 re-check
        return True
    finally:
        if fd is not None:
            os.close(fd)
