"""The DPU node's NATS handlers: invoke (each invocation id once), maps, drain, and its heartbeat."""

from ebpf_runtime.programs import ProgramRuntime
from fabric import bus, nodes
from schemas import codec, subjects
from schemas.ebpf import MapsReply, MapsRequest
from schemas.messages import (
    DrainNode,
    DrainReply,
    ErrorReply,
    Heartbeat,
    InvokeReply,
    NodeInvoke,
    RecentReply,
    RecentRequest,
    error_reply,
)


class DpuNode:
    def __init__(self, runtime: ProgramRuntime, capacity: int):
        self.runtime = runtime
        self.capacity = capacity
        self.node_id = runtime.node_id
        self.once = nodes.Once(runtime.node_id)

    def routes(self) -> list[bus.Route]:
        return [
            # A warm invocation with a core free runs its program and answers as it is read.
            bus.Route(
                subjects.node_invoke(self.node_id),
                codec.node_invoke,
                self.on_invoke,
                fast=self.on_invoke_now,
                eager=True,
            ),
            bus.Route(subjects.node_maps(self.node_id), codec.maps_request, self.on_maps),
            bus.Route(subjects.node_drain(self.node_id), codec.drain_node, self.on_drain),
            bus.Route(subjects.node_recent(self.node_id), codec.recent_request, self.on_recent),
            self.once.route(),
        ]

    async def on_recent(self, req: RecentRequest, ctx: bus.Context) -> RecentReply:
        return RecentReply(invocations=self.runtime.recent.of(req.tenant, req.function))

    async def on_drain(self, req: DrainNode, ctx: bus.Context) -> DrainReply:
        """Drained: the schedulers place nothing more here; its loaded programs stay (a program
        holds no process, and its tenant's maps must outlive a maintenance window)."""
        return DrainReply(node_id=self.node_id, cordoned=req.drain, running=self.runtime.inflight)

    def on_invoke_now(
        self, req: NodeInvoke, ctx: bus.Context
    ) -> InvokeReply | ErrorReply | bus.ReplyTo | bus.Pass:
        """The fast path: a warm invocation with a core free, run without a coroutine. A copy
        of an invocation seen before, a first use (the load) and a wait for a core go to
        `on_invoke` (PASS)."""
        if self.once.has(nodes.run_key(req)) or self.runtime.inflight >= self.capacity:
            return bus.PASS
        reply = self.runtime.run_now(req, ctx)
        if reply is None:
            return bus.PASS
        self.once.remember(nodes.run_key(req), reply)
        return nodes.answer(req, reply)

    async def on_invoke(self, req: NodeInvoke, ctx: bus.Context) -> InvokeReply | ErrorReply | bus.ReplyTo:
        reply = await self.once.run(nodes.run_key(req), lambda: self._invoke(req, ctx))
        return nodes.answer(req, reply)

    async def _invoke(self, req: NodeInvoke, ctx: bus.Context) -> InvokeReply | ErrorReply:
        if self.runtime.inflight >= self.capacity:
            why = f"node is running {self.runtime.inflight} invocations, its capacity"
            return error_reply("throttled", why, req.invocation_id, self.node_id)
        return await self.runtime.traced_invoke(req, ctx)

    async def on_maps(self, req: MapsRequest, ctx: bus.Context) -> MapsReply:
        """The maps of this tenant's function, and nobody else's: the key includes the tenant."""
        return self.runtime.maps(req)

    def heartbeat(self, seq: int) -> Heartbeat:
        runtime = self.runtime
        return Heartbeat(
            node_id=self.node_id,
            seq=seq,
            inflight=runtime.inflight,
            capacity=self.capacity,
            instances=len(runtime.loaded),
            warm_idle=runtime.warm_keys(),
            tenant_runs=dict(runtime.tenant_runs),
            tenants=runtime.tenant_usage(),
        )
