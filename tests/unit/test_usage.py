"""CPU and memory per function (host_node/usage.py) over fake /proc readings: a running total that
never goes back when instances exit, and memory of the live ones only."""

import asyncio
import os

from host_node.usage import FunctionUsage, cpu_seconds, resident_bytes


class FakeProcess:
    def __init__(self, pid: int):
        self.pid = pid
        self.phases = None
        self.oom_killed = False
        self.cpu_s: float | None = None
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def kill(self) -> None:
        self.exited.set_result(-9)


async def test_cpu_is_a_running_total_across_exits() -> None:
    cpu = {1: 0.5, 2: 0.25}
    usage = FunctionUsage(read_cpu=cpu.get, read_memory=lambda pid: 1000.0 * pid)
    first, second = FakeProcess(1), FakeProcess(2)
    usage.track(("hello", "acme"), first)
    usage.track(("hello", "acme"), second)
    assert usage.cpu() == {("hello", "acme"): 0.75}
    assert usage.memory() == {("hello", "acme"): 3000.0}

    cpu[1] = 2.0
    usage.read(first)  # what the node does just before it stops an instance
    del cpu[1]
    first.kill()
    await asyncio.sleep(0)  # the exit's callback

    assert usage.cpu() == {("hello", "acme"): 2.25}, "the exited instance's last reading stays counted"
    assert usage.memory() == {("hello", "acme"): 2000.0}, "only live instances hold memory"


async def test_a_reading_never_goes_back() -> None:
    cpu = {7: 1.0}
    usage = FunctionUsage(read_cpu=cpu.get, read_memory=lambda pid: None)
    proc = FakeProcess(7)
    usage.track(("f", "t"), proc)
    assert usage.cpu() == {("f", "t"): 1.0}
    cpu[7] = 0.1  # the pid now names another process
    assert usage.cpu() == {("f", "t"): 1.0}
    assert usage.memory() == {}


async def test_the_spawners_count_at_exit_replaces_a_lower_reading() -> None:
    cpu: dict[int, float] = {}  # an exec call: gone before any collection read it
    usage = FunctionUsage(read_cpu=cpu.get, read_memory=lambda pid: None)
    short, long_lived = FakeProcess(3), FakeProcess(4)
    usage.track(("f", "t"), short)
    usage.track(("g", "t"), long_lived)
    cpu[4] = 0.75
    assert usage.cpu() == {("f", "t"): 0.0, ("g", "t"): 0.75}
    short.cpu_s, long_lived.cpu_s = 0.5, 0.25  # the cgroup's since the function began; none for /proc's
    short.kill()
    long_lived.kill()
    await asyncio.sleep(0)  # the exits' callbacks

    assert usage.cpu() == {("f", "t"): 0.5, ("g", "t"): 0.75}, "the higher of the two, never less"


def test_this_process_as_proc_shows_it() -> None:
    burned = 0
    started = os.times()
    while os.times().user - started.user < 0.05:
        burned += 1
    assert cpu_seconds(os.getpid()) >= 0.05
    assert (resident_bytes(os.getpid()) or 0) > 1 << 20
    assert cpu_seconds(2**22 + 1) is None, "no such process"
