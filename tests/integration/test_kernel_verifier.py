"""The whole verification against the real kernel verifier (in its worker): what the static
checks cannot see is refused by the kernel in strict mode, with its own words and the
instruction; and a walk that would take the kernel seconds is stopped at its CPU budget."""

import asyncio
import os
import time

import pytest

from tests.bpf_build import COUNTER, bpf_builder
from verifier_service.admission import FairTurns
from verifier_service.kernel import KernelPool
from verifier_service.pipeline import VerifyLimits, verify
from verifier_service.settings import VerifierSettings

pytestmark = pytest.mark.privileged

XDP_PASS = 2
UNCHECKED_PACKET = """
SEC("xdp")
int peek(struct xdp_md *ctx) { unsigned char *data = (void *)(long)ctx->data; return data[20]; }
"""
UNINITIALISED_STACK = """
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 4); __type(key, __u32); __type(value, __u64); }
store SEC(".maps");

SEC("xdp")
int uninit(struct xdp_md *ctx)
{
    __u32 key;  /* never written */
    __u64 value = 1;
    bpf_map_update_elem(&store, &key, &value, 0);
    return XDP_PASS;
}
"""
POINTER_LEAK = """
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1); __type(key, __u32); __type(value, __u64); }
leak SEC(".maps");

SEC("xdp")
int leaky(struct xdp_md *ctx)
{
    __u32 key = 0;
    __u64 *value = bpf_map_lookup_elem(&leak, &key);
    if (value)
        *value = (__u64)(long)value;  /* a kernel address, handed to whoever reads the map */
    return XDP_PASS;
}
"""
UNBOUNDED_LOOP = """
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1); __type(key, __u32); __type(value, __u64); }
bound SEC(".maps");

SEC("xdp")
int spin(struct xdp_md *ctx)
{
    __u32 key = 0;
    __u64 *n = bpf_map_lookup_elem(&bound, &key);
    if (!n)
        return XDP_PASS;
    volatile __u64 sum = 0;
    for (__u64 i = 0; i < *n; i++)
        sum += i;
    return sum ? XDP_DROP : XDP_PASS;
}
"""


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory):
    if os.geteuid() != 0:
        pytest.skip("loading eBPF programs needs root (CAP_BPF and CAP_NET_ADMIN)")
    return bpf_builder(tmp_path_factory.mktemp("bpf"))


async def test_a_legitimate_program_is_accepted_with_its_cost(build) -> None:
    verdict = await verify(build("counter", COUNTER), None, "xdp", VerifyLimits())

    assert verdict.accepted, verdict.reasons
    assert verdict.verified_insns > 0 and verdict.run_ns > 0
    assert verdict.sample_retvals == [XDP_PASS] and verdict.helpers == [1]  # bpf_map_lookup_elem


@pytest.mark.parametrize(
    ("name", "source", "words"),
    [
        ("unchecked_packet", UNCHECKED_PACKET, "outside of the packet"),
        ("uninitialised_stack", UNINITIALISED_STACK, "invalid read from stack"),
        ("pointer_leak", POINTER_LEAK, "leaks addr"),
    ],
)
async def test_the_kernel_refuses_what_static_checks_cannot_see(
    build, name: str, source: str, words: str
) -> None:
    verdict = await verify(build(name, source), None, "xdp", VerifyLimits(), mode="strict")

    assert not verdict.accepted
    [reason] = verdict.reasons
    assert reason.code == "kernel_verifier" and words in reason.message, reason
    assert reason.insn is not None, "the refusal points at an instruction"


@pytest.mark.parametrize("mode", ["strict", "proven"])
async def test_a_verification_bomb_is_stopped_at_its_cpu_budget(build, mode: str) -> None:
    """The kernel would walk this loop to its 1M-instruction limit (3-5 s); the worker is killed
    once it has spent the budget, long before the wall-clock deadline."""
    limits = VerifyLimits(kernel_cpu_budget_s=0.3, proven_cpu_budget_s=0.3, kernel_timeout_s=30.0)
    started = time.monotonic()
    verdict = await verify(build("bomb", UNBOUNDED_LOOP), None, "xdp", limits, mode=mode)
    elapsed = time.monotonic() - started

    assert not verdict.accepted
    [reason] = verdict.reasons
    assert reason.code == "verified_insn_budget" and "0.3 s of CPU" in reason.message, reason
    assert elapsed < 3.0, f"took {elapsed:.1f} s: not stopped at the budget"


async def test_a_light_program_is_not_queued_behind_other_tenants_bombs(build) -> None:
    """Per tenant one verification in flight, and more workers than busy tenants: a light
    program is verified while two other tenants' bombs are still in the kernel (before, with
    two workers, it waited for a bomb to end)."""
    settings = VerifierSettings(verifier_id="v", nats_url="", key_path="")
    pool, turns = KernelPool(settings.workers), FairTurns(settings.workers)
    await pool.start()
    limits = VerifyLimits(kernel_cpu_budget_s=settings.kernel_cpu_budget_s, modes=("strict",))
    bomb, light = build("bomb", UNBOUNDED_LOOP), build("counter", COUNTER)
    try:
        bombs = [
            asyncio.create_task(turns.run(tenant, lambda: verify(bomb, None, "xdp", limits, kernel=pool)))
            for tenant in ("heavy-1", "heavy-2")
        ]
        reply = await turns.run("light", lambda: verify(light, None, "xdp", limits, kernel=pool))
        still_walking = [not task.done() for task in bombs]
        refused = await asyncio.gather(*bombs)
    finally:
        await pool.close()
    assert reply.accepted and still_walking == [True, True]
    assert [r.reasons[0].code for r in refused] == ["verified_insn_budget"] * 2


LONG_LOOP = """
SEC("xdp")
int long_walk(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
    __u32 x = ctx->ingress_ifindex, s = data_end - data;   /* packet length: proven mode only */
    for (int i = 0; i < 6000; i++)                          /* ~66 000 instructions walked */
        s = s * 31 + (x ^ i);
    return s & 1 ? XDP_DROP : XDP_PASS;
}
"""


async def test_a_proven_program_within_the_instruction_budget_is_not_stopped_for_cpu(build) -> None:
    """Proven mode's level-2 load and proof cost about ten times a strict walk (bench/RESULTS.md):
    a program well inside the 100 000-instruction budget must not be cut off by the CPU budget."""
    verdict = await verify(build("long_loop", LONG_LOOP), None, "xdp", VerifyLimits(), mode="proven")
    assert verdict.accepted, verdict.reasons
    assert 50_000 < verdict.verified_insns < VerifyLimits().max_verified_insns
