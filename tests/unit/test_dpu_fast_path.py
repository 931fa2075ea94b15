"""A DPU node's fast path: which invocations run as they are read and which go to the handler.
The program is a stand-in (the kernel's part is tested in tests/integration/test_dpu.py)."""

import time

from dpu_node.service import DpuNode
from ebpf_runtime.programs import ProgramRuntime
from ebpf_runtime.settings import EbpfRuntimeSettings
from fabric import bus
from schemas.messages import EbpfSpec, ErrorReply, FunctionSpec, InvokeReply, NodeInvoke

SPEC = FunctionSpec(
    name="counter", runtime="ebpf", tenant="a", placement="dpu", ebpf=EbpfSpec(object="c.o", prog_type="xdp")
)


class Program:
    """Stands in for a loaded program: XDP_PASS, the packet back, and a count of runs."""

    runs = 0

    def run(self, packet: bytes) -> tuple[int, bytes, int]:
        self.runs += 1
        return 2, packet, 170


def node(tenant_concurrency: int = 4) -> tuple[DpuNode, Program]:
    settings = EbpfRuntimeSettings(trusted_keys=[], cores=1, tenant_concurrency=tenant_concurrency)
    runtime = ProgramRuntime(settings, "dpu-1", None, {})  # type: ignore[arg-type]  # no etcd needed
    program = Program()
    runtime.loaded[("a", "counter", "sha256-p")] = program  # type: ignore[assignment]
    return DpuNode(runtime, capacity=16), program


def invoke(invocation_id: str, digest: str = "sha256-p") -> NodeInvoke:
    return NodeInvoke(
        invocation_id=invocation_id,
        spec=SPEC,
        bundle_digest="",
        program_digest=digest,
        payload=b"packet",
        timeout_ms=1000,
        reply_to="_INBOX.caller.1",
        batch_acks=True,
    )


def ctx() -> bus.Context:
    return bus.Context(
        subject="hetfaas.node.dpu-1.invoke", headers=None, received_at=time.monotonic(), reply="_INBOX.s.1"
    )


async def test_a_warm_invocation_runs_as_it_is_read_and_its_copy_goes_to_the_handler() -> None:
    dpu, program = node()
    answer = dpu.on_invoke_now(invoke("i1"), ctx())
    assert isinstance(answer, bus.ReplyTo) and answer.subject == "_INBOX.caller.1"
    reply = answer.message
    assert isinstance(reply, InvokeReply) and (reply.retval, reply.action, reply.output) == (
        2,
        "XDP_PASS",
        b"packet",
    )
    assert not reply.cold_start and program.runs == 1
    assert dpu.on_invoke_now(invoke("i1"), ctx()) is bus.PASS, "a copy joins the first's answer"
    again = await dpu.on_invoke(invoke("i1"), ctx())
    assert isinstance(again, bus.ReplyTo) and again.message == reply and program.runs == 1


async def test_a_first_use_or_a_busy_core_waits_on_the_handler_s_path() -> None:
    dpu, program = node()
    assert dpu.on_invoke_now(invoke("cold", digest="sha256-other"), ctx()) is bus.PASS, "not loaded yet"
    await dpu.runtime._cores.acquire()  # the one core is busy
    assert dpu.on_invoke_now(invoke("waits"), ctx()) is bus.PASS
    dpu.runtime._cores.release()
    assert program.runs == 0


async def test_a_tenant_at_its_share_is_refused_to_the_scheduler_and_may_run_later() -> None:
    """The refusal goes to the scheduler (which retries elsewhere), not to the caller, and is
    not remembered: the same invocation runs once the tenant has room."""
    dpu, program = node(tenant_concurrency=1)
    dpu.runtime._tenant_running["a"] = 1  # one of the tenant's programs waits for a core
    refused = dpu.on_invoke_now(invoke("i2"), ctx())
    assert isinstance(refused, ErrorReply) and refused.error.code == "throttled", refused
    assert program.runs == 0
    dpu.runtime._tenant_running["a"] = 0
    ran = dpu.on_invoke_now(invoke("i2"), ctx())
    assert isinstance(ran, bus.ReplyTo) and program.runs == 1
