"""The DPU node's own admission: beyond its capacity it refuses, and the refusal is forgotten."""

import asyncio

from dpu_node.service import DpuNode
from fabric import bus
from schemas.messages import ErrorReply, FunctionSpec, InvokeReply, NodeInvoke

SPEC = FunctionSpec(name="f", tenant="t", runtime="ebpf")
CTX = bus.Context(subject="s", headers=None, received_at=0.0, reply="")


class Runtime:
    """Stands in for ProgramRuntime: counts what is in flight, answers when released."""

    node_id = "dpu-1"

    def __init__(self) -> None:
        self.inflight = 0
        self.release = asyncio.Event()
        self.full = asyncio.Event()  # as many running as the node's capacity (2)

    async def traced_invoke(self, req: NodeInvoke, ctx: bus.Context) -> InvokeReply:
        self.inflight += 1
        if self.inflight == 2:
            self.full.set()
        await self.release.wait()
        self.inflight -= 1
        return InvokeReply(
            invocation_id=req.invocation_id, node=self.node_id, cold_start=False, duration_ms=0, output=b""
        )


def invoke(n: int) -> NodeInvoke:
    return NodeInvoke(invocation_id=f"i{n}", spec=SPEC, bundle_digest="", payload=b"", timeout_ms=1000)


async def test_beyond_its_capacity_the_node_answers_throttled_and_a_later_copy_runs() -> None:
    runtime = Runtime()
    node = DpuNode(runtime, capacity=2)  # type: ignore[arg-type]
    running = [asyncio.create_task(node.on_invoke(invoke(n), CTX)) for n in range(2)]
    await runtime.full.wait()
    refused = await node.on_invoke(invoke(2), CTX)
    assert isinstance(refused, ErrorReply) and refused.error.code == "throttled"
    runtime.release.set()
    assert all(isinstance(r, InvokeReply) for r in await asyncio.gather(*running))
    again = await node.on_invoke(invoke(2), CTX)  # nothing ran: the same id may run now
    assert isinstance(again, InvokeReply) and again.invocation_id == "i2"
